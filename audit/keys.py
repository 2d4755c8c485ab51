"""Ed25519 digest keys: where they come from, which one signs, and which public keys are known.

- Private keys come from ``SANDBOX_DIGEST_ED25519_KEYS`` ("id:base64-seed,...") when set, else
  from PEM files ``<id>.pem`` in ``SANDBOX_DIGEST_ED25519_DIR``. The current key
  (``SANDBOX_DIGEST_ED25519_CURRENT``) is generated there once, with O_EXCL so that two processes
  starting together agree on one key, and its public half is written beside it (``<id>.pub.pem``).
- Rotation: set a new current id; the next digest generates (or loads) that key. Old keys stay
  known by their public half, so their digests keep verifying even after the private file is
  destroyed.
- Every key that signs is registered in the database (``DigestKey``) before its first digest,
  so every host of a shared database can verify and export digests signed elsewhere; a host
  holding a different private key under a registered id is refused rather than allowed to
  sign digests no one else could check.

Loading is lazy (never at settings import), so processes that never sign never touch key files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from audit import signing

__all__ = [
    "KeyInfo",
    "current_key",
    "known_public_keys",
    "public_key_infos",
    "register",
]

log = logging.getLogger("sandbox.audit.keys")


@dataclass(frozen=True)
class KeyInfo:
    """A public key as exported to auditors."""

    key_id: str
    algorithm: str
    public_key: str  # base64 of the raw 32 bytes
    fingerprint: str
    current: bool
    can_sign: bool  # this host holds the private half

    @property
    def pem(self) -> str:
        return signing.public_to_pem(signing.public_from_b64(self.public_key))

    def as_dict(self) -> dict[str, object]:
        return {
            "key_id": self.key_id,
            "algorithm": self.algorithm,
            "public_key": self.public_key,
            "public_key_pem": self.pem,
            "fingerprint": self.fingerprint,
            "current": self.current,
            "can_sign": self.can_sign,
        }


def _check_id(key_id: str, source: str) -> str:
    if not signing.KEY_ID_RE.match(key_id):
        raise ImproperlyConfigured(
            f"{source}: key id {key_id!r} must be 1-64 letters, digits, '.', '_' or '-'"
        )
    return key_id


def _pairs(text: str, source: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        key_id, sep, value = item.partition(":")
        if not sep or not value:
            raise ImproperlyConfigured(f"{source}: expected 'id:base64,...', got {item!r}")
        out[_check_id(key_id.strip(), source)] = value.strip()
    return out


def _key_dir() -> Path:
    return Path(settings.SANDBOX_DIGEST_ED25519_DIR)


def _private_keys() -> dict[str, Ed25519PrivateKey]:
    env = settings.SANDBOX_DIGEST_ED25519_KEYS
    keys: dict[str, Ed25519PrivateKey] = {}
    if env:
        for key_id, text in _pairs(env, "SANDBOX_DIGEST_ED25519_KEYS").items():
            try:
                keys[key_id] = signing.private_from_text(text)
            except ValueError as exc:
                raise ImproperlyConfigured(f"SANDBOX_DIGEST_ED25519_KEYS[{key_id}]: {exc}") from exc
        return keys
    directory = _key_dir()
    if directory.is_dir():
        for path in sorted(directory.glob("*.pem")):
            if path.name.endswith(".pub.pem"):
                continue
            key_id = _check_id(path.name.removesuffix(".pem"), str(path))
            try:
                keys[key_id] = signing.private_from_text(path.read_text())
            except ValueError as exc:
                raise ImproperlyConfigured(f"{path}: {exc}") from exc
    return keys


def _public_only() -> dict[str, Ed25519PublicKey]:
    keys: dict[str, Ed25519PublicKey] = {}
    env = settings.SANDBOX_DIGEST_ED25519_PUBLIC_KEYS
    for key_id, text in _pairs(env, "SANDBOX_DIGEST_ED25519_PUBLIC_KEYS").items():
        try:
            keys[key_id] = signing.public_from_b64(text)
        except ValueError as exc:
            raise ImproperlyConfigured(
                f"SANDBOX_DIGEST_ED25519_PUBLIC_KEYS[{key_id}]: {exc}"
            ) from exc
    directory = _key_dir()
    if directory.is_dir():
        for path in sorted(directory.glob("*.pub.pem")):
            key_id = _check_id(path.name.removesuffix(".pub.pem"), str(path))
            loaded = serialization.load_pem_public_key(path.read_bytes())
            if not isinstance(loaded, Ed25519PublicKey):
                raise ImproperlyConfigured(f"{path} is not an Ed25519 public key")
            keys.setdefault(key_id, loaded)
    return keys


def _generate(key_id: str) -> Ed25519PrivateKey:
    """Create ``<id>.pem`` (0600) and ``<id>.pub.pem`` once; a racing process reads the winner's."""
    directory = _key_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{key_id}.pem"
    key = Ed25519PrivateKey.generate()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return signing.private_from_text(path.read_text())
    with os.fdopen(fd, "w") as fh:
        fh.write(signing.private_to_pem(key))
    (directory / f"{key_id}.pub.pem").write_text(signing.public_to_pem(key.public_key()))
    log.info("generated Ed25519 digest key", extra={"key_id": key_id, "path": str(path)})
    return key


def current_key() -> tuple[str, Ed25519PrivateKey]:
    """The key new digests are signed with, generated on first use unless keys come from env."""
    key_id = _check_id(settings.SANDBOX_DIGEST_ED25519_CURRENT, "SANDBOX_DIGEST_ED25519_CURRENT")
    keys = _private_keys()
    if key_id in keys:
        return key_id, keys[key_id]
    if settings.SANDBOX_DIGEST_ED25519_KEYS:
        raise ImproperlyConfigured(
            f"SANDBOX_DIGEST_ED25519_CURRENT is {key_id!r} but SANDBOX_DIGEST_ED25519_KEYS "
            "has no key of that id"
        )
    return key_id, _generate(key_id)


def register(key_id: str, public: Ed25519PublicKey) -> None:
    """Record ``key_id``'s public key before it signs; refuse a different key under that id."""
    from audit.models import DigestKey

    b64 = signing.public_b64(public)
    row, created = DigestKey.objects.get_or_create(
        key_id=key_id,
        defaults={
            "algorithm": signing.ED25519,
            "public_key": b64,
            "fingerprint": signing.fingerprint(b64),
            "created_at": datetime.now(UTC),
        },
    )
    if not created and row.public_key != b64:
        raise ImproperlyConfigured(
            f"digest key {key_id!r} is registered with fingerprint {row.fingerprint[:16]}… but "
            f"this host holds another key: copy the key file to every host, or choose a new id "
            f"with SANDBOX_DIGEST_ED25519_CURRENT"
        )


def known_public_keys() -> dict[str, str]:
    """Key id to base64 public key: the database registry first, then this host's keys."""
    from audit.models import DigestKey

    known = dict(DigestKey.objects.values_list("key_id", "public_key"))
    for key_id, public in _public_only().items():
        known.setdefault(key_id, signing.public_b64(public))
    for key_id, private in _private_keys().items():
        known.setdefault(key_id, signing.public_b64(private.public_key()))
    return known


def public_key_infos() -> list[KeyInfo]:
    current = settings.SANDBOX_DIGEST_ED25519_CURRENT
    private = _private_keys()
    return [
        KeyInfo(
            key_id=key_id,
            algorithm=signing.ED25519,
            public_key=public,
            fingerprint=signing.fingerprint(public),
            current=key_id == current,
            can_sign=key_id in private,
        )
        for key_id, public in sorted(known_public_keys().items())
    ]
