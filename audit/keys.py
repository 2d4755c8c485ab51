"""Ed25519 digest keys: where they come from, which one signs, and which public keys are trusted.

- Private keys come from ``SANDBOX_DIGEST_ED25519_KEYS`` ("id:base64-seed,...") when set, else
  from PEM files ``<id>.pem`` in ``SANDBOX_DIGEST_ED25519_DIR``. The current key
  (``SANDBOX_DIGEST_ED25519_CURRENT``) is generated there once, with O_EXCL so that two processes
  starting together agree on one key, and its public half is written beside it (``<id>.pub.pem``).
- Trust comes from configuration, never from the database: this host's key files and keys,
  ``SANDBOX_DIGEST_ED25519_PUBLIC_KEYS`` and the pinned fingerprints of
  ``SANDBOX_DIGEST_TRUSTED_FINGERPRINTS``; and from the key history (``DigestKey``, append-only
  and chained), but only through rotation statements signed by a key already trusted. A history
  row that none of these vouches for makes ``trusted_public_keys`` raise ``KeyTrustError``, so
  verification, signing and exports fail loudly (``audit.signing.check_key_history``).
- Rotation: ``manage.py rotate_key digest-key`` (``rotate``) generates ``ed25519-<N+1>``, which
  becomes current (the newest numbered key in the directory, unless
  ``SANDBOX_DIGEST_ED25519_CURRENT`` names one), and registers it with a statement signed by the
  previous key. Setting a new current id works too: the next digest generates (or loads) that key
  and registers it likewise when this host holds the previous key. A key registered without the
  previous key's signature (a new host with a key of its own) is trusted only where it is
  configured: pin its fingerprint on the other hosts. ``retire`` deletes a former key's private
  half and keeps its public half, so what it signed stays verifiable.

Loading is lazy (never at settings import), so processes that never sign never touch key files.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction

from audit import signing
from audit.events import lock
from audit.models import DigestKey

__all__ = [
    "KeyInfo",
    "KeyTrustError",
    "configured_public_keys",
    "current_key",
    "current_key_id",
    "pinned_fingerprints",
    "public_key_infos",
    "register",
    "retire",
    "rotate",
    "trusted_public_keys",
]

log = logging.getLogger("sandbox.audit.keys")

DEFAULT_KEY_ID = "ed25519-1"
NUMBERED_ID_RE = re.compile(r"ed25519-([1-9][0-9]{0,5})")


class KeyTrustError(Exception):
    """The key history holds a key that this host's configuration cannot vouch for."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class KeyInfo:
    """A trusted public key as exported to auditors, with its entry in the key history."""

    key_id: str
    algorithm: str
    public_key: str  # base64 of the raw 32 bytes
    fingerprint: str
    current: bool
    can_sign: bool  # this host holds the private half
    trusted_as: str = ""  # configured, pinned, rotated from <id>
    statement: str = ""  # the key history's signed statement ("" for a key only configured)
    signed_by: str = ""
    signature: str = ""
    in_history: bool = False  # a row of the key history (else known from configuration only)

    def history_entry(self) -> dict[str, object]:
        """The entry of ``keys.json`` in a bundle: what the offline verifier checks."""
        return {
            "key_id": self.key_id,
            "algorithm": self.algorithm,
            "public_key": self.public_key,
            "fingerprint": self.fingerprint,
            "statement": self.statement,
            "signed_by": self.signed_by,
            "signature": self.signature,
            "in_history": self.in_history,
        }

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
            "trusted_as": self.trusted_as,
            "statement": self.statement,
            "signed_by": self.signed_by,
            "signature": self.signature,
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


def _numbered(ids: Any) -> dict[int, str]:
    out: dict[int, str] = {}
    for key_id in ids:
        match = NUMBERED_ID_RE.fullmatch(key_id)
        if match:
            out[int(match.group(1))] = key_id
    return out


def current_key_id() -> str:
    """The id of the key new digests are signed with: ``SANDBOX_DIGEST_ED25519_CURRENT`` when
    set, else the newest ``ed25519-<N>`` private key in the key directory, else ``ed25519-1``.

    Read at each use, so a rotation (``rotate``) takes effect without a restart.
    """
    if settings.SANDBOX_DIGEST_ED25519_CURRENT:
        return _check_id(settings.SANDBOX_DIGEST_ED25519_CURRENT, "SANDBOX_DIGEST_ED25519_CURRENT")
    if settings.SANDBOX_DIGEST_ED25519_KEYS:
        raise ImproperlyConfigured(
            "SANDBOX_DIGEST_ED25519_KEYS is set: name the signing key in "
            "SANDBOX_DIGEST_ED25519_CURRENT"
        )
    numbered = _numbered(_private_keys())
    return numbered[max(numbered)] if numbered else DEFAULT_KEY_ID


def current_key() -> tuple[str, Ed25519PrivateKey]:
    """The key new digests are signed with, generated on first use unless keys come from env."""
    key_id = current_key_id()
    keys = _private_keys()
    if key_id in keys:
        return key_id, keys[key_id]
    if settings.SANDBOX_DIGEST_ED25519_KEYS:
        raise ImproperlyConfigured(
            f"SANDBOX_DIGEST_ED25519_CURRENT is {key_id!r} but SANDBOX_DIGEST_ED25519_KEYS "
            "has no key of that id"
        )
    return key_id, _generate(key_id)


def configured_public_keys() -> dict[str, str]:
    """Key id to base64 public key, from this host's configuration only (never the database)."""
    known = {k: signing.public_b64(p) for k, p in _public_only().items()}
    for key_id, private in _private_keys().items():
        public = signing.public_b64(private.public_key())
        if known.setdefault(key_id, public) != public:
            raise ImproperlyConfigured(
                f"digest key {key_id!r}: the private key and the configured public key differ"
            )
    return known


def pinned_fingerprints() -> frozenset[str]:
    text = settings.SANDBOX_DIGEST_TRUSTED_FINGERPRINTS
    pins = frozenset(p.strip().lower() for p in text.split(",") if p.strip())
    for pin in pins:
        if len(pin) != 64 or any(c not in "0123456789abcdef" for c in pin):
            raise ImproperlyConfigured(
                f"SANDBOX_DIGEST_TRUSTED_FINGERPRINTS: {pin!r} is not a SHA-256 hex fingerprint"
            )
    return pins


def _history_rows() -> list[Any]:
    return list(DigestKey.objects.order_by("id"))


def _entry(row: Any) -> dict[str, str]:
    return {
        "key_id": row.key_id,
        "public_key": row.public_key,
        "fingerprint": row.fingerprint,
        "statement": row.statement,
        "signed_by": row.signed_by,
        "signature": row.signature,
    }


def _check_history(rows: list[Any]) -> signing.KeyHistory:
    return signing.check_key_history(
        [_entry(r) for r in rows],
        configured=configured_public_keys(),
        pinned=pinned_fingerprints(),
    )


def trusted_public_keys() -> dict[str, str]:
    """Key id to base64 public key, for every key this host may trust.

    Raises ``KeyTrustError`` when the key history holds a key that neither the configuration
    nor a trusted key's signed rotation statement vouches for: the database cannot vouch for a
    key by itself, and a verifier must not quietly skip what it cannot trust.
    """
    history = _check_history(_history_rows())
    if history.problems:
        raise KeyTrustError(history.problems)
    return history.trusted


def _private_for(key_id: str, public: Ed25519PublicKey) -> Ed25519PrivateKey:
    private = _private_keys().get(key_id)
    if private is None or signing.public_b64(private.public_key()) != signing.public_b64(public):
        raise ImproperlyConfigured(f"this host does not hold the private key of {key_id!r}")
    return private


def register(key_id: str, key: Ed25519PrivateKey | Ed25519PublicKey) -> None:
    """Record ``key_id`` in the key history before it signs; refuse a different key under it.

    A new key's statement is signed by the previous key when this host holds it (a rotation,
    trusted wherever the previous key is), else by the new key itself (trusted only where it is
    configured). Runs under the append lock, so two hosts cannot fork the history.
    """
    private = key if isinstance(key, Ed25519PrivateKey) else _private_for(key_id, key)
    b64 = signing.public_b64(private.public_key())
    with transaction.atomic():
        lock()
        rows = _history_rows()
        row = next((r for r in rows if r.key_id == key_id), None)
        if row is not None:
            if row.public_key != b64:
                raise ImproperlyConfigured(
                    f"digest key {key_id!r} is registered with fingerprint {row.fingerprint} but "
                    f"this host holds the key with fingerprint {signing.fingerprint(b64)}. Do "
                    "not replace either key to make them agree: check both fingerprints against "
                    "the ones recorded out of band (a rewritten key registry is how a forger "
                    "would get a key adopted). A new host signs with a key id of its own "
                    "(SANDBOX_DIGEST_ED25519_CURRENT), trusted elsewhere by its fingerprint "
                    "(SANDBOX_DIGEST_TRUSTED_FINGERPRINTS)."
                )
            return
        previous = rows[-1] if rows else None
        signer_id, signer = key_id, private
        if previous is not None:
            held = _private_keys().get(previous.key_id)
            if held is not None and signing.public_b64(held.public_key()) == previous.public_key:
                signer_id, signer = previous.key_id, held
        created_at = datetime.now(UTC)
        statement = signing.key_statement(
            key_id=key_id,
            public_key=b64,
            created_at=created_at.isoformat(timespec="microseconds"),
            signed_by=signer_id,
            previous_key_id=previous.key_id if previous else "",
            previous_statement=previous.statement if previous else None,
        )
        DigestKey.objects.create(
            key_id=key_id,
            algorithm=signing.ED25519,
            public_key=b64,
            fingerprint=signing.fingerprint(b64),
            created_at=created_at,
            statement=statement,
            signed_by=signer_id,
            signature=signing.sign(signer, statement),
        )
        if signer_id == key_id and previous is not None:
            log.warning(
                "digest key registered without the previous key's signature: other hosts "
                "trust it only once its fingerprint is pinned",
                extra={"key_id": key_id, "fingerprint": signing.fingerprint(b64)},
            )


def public_key_infos() -> list[KeyInfo]:
    """The trusted keys, in key-history order, then keys known only from configuration.

    A history row this host cannot vouch for is left out (and logged); verification reports it.
    """
    current = current_key_id()
    private = _private_keys()
    rows = _history_rows()
    history = _check_history(rows)
    for problem in history.problems:
        log.error("untrusted digest key history", extra={"problem": problem})
    infos: list[KeyInfo] = []
    listed: set[str] = set()
    for row in rows:
        if history.trusted.get(row.key_id) != row.public_key:
            continue
        listed.add(row.key_id)
        infos.append(
            KeyInfo(
                key_id=row.key_id,
                algorithm=signing.ED25519,
                public_key=row.public_key,
                fingerprint=row.fingerprint,
                current=row.key_id == current,
                can_sign=row.key_id in private,
                trusted_as=history.how.get(row.key_id, ""),
                statement=row.statement,
                signed_by=row.signed_by,
                signature=row.signature,
                in_history=True,
            )
        )
    for key_id, public in sorted(history.trusted.items()):
        if key_id in listed:
            continue
        infos.append(
            KeyInfo(
                key_id=key_id,
                algorithm=signing.ED25519,
                public_key=public,
                fingerprint=signing.fingerprint(public),
                current=key_id == current,
                can_sign=key_id in private,
                trusted_as=history.how.get(key_id, "configured"),
            )
        )
    return infos


def _env_managed(action: str) -> None:
    if settings.SANDBOX_DIGEST_ED25519_KEYS or settings.SANDBOX_DIGEST_ED25519_CURRENT:
        raise ImproperlyConfigured(
            f"digest keys come from the environment (SANDBOX_DIGEST_ED25519_KEYS / _CURRENT): "
            f'{action} them there (docs/security.md, "Key rotation")'
        )


def rotate(record: Callable[[str, str], None]) -> tuple[str, str]:
    """Generate ``ed25519-<N+1>``, make it current and register it, its rotation statement
    signed by the key it replaces: (previous id, new id). Verifiers that trust the old key
    trust the new one through that statement; digests signed before stay verifiable.

    ``record(previous, new)`` runs in the same transaction (the rotation's event); when it or
    the registration fails, the new key files are removed again, so no unrecorded key signs.
    """
    _env_managed("rotate")
    previous_id, previous = current_key()
    register(previous_id, previous)
    directory = _key_dir()
    known = set(_private_keys()) | set(_public_only()) | {r.key_id for r in _history_rows()}
    numbered = _numbered(known)
    key_id = f"ed25519-{max(numbered, default=0) + 1}"
    if (directory / f"{key_id}.pem").exists():
        raise ImproperlyConfigured(f"{directory / key_id}.pem exists already")
    key = _generate(key_id)
    try:
        with transaction.atomic():
            register(key_id, key)
            record(previous_id, key_id)
    except BaseException:
        for name in (f"{key_id}.pem", f"{key_id}.pub.pem"):
            (directory / name).unlink(missing_ok=True)
        raise
    return previous_id, key_id


def retire(key_id: str) -> Path:
    """Delete the private half of a key that no longer signs; its public half stays (beside it
    as ``<id>.pub.pem`` and in the key history), so what it signed stays verifiable."""
    _env_managed("retire")
    _check_id(key_id, "key id")
    if key_id == current_key_id():
        raise ImproperlyConfigured(f"{key_id} is the current signing key: rotate first")
    directory = _key_dir()
    path = directory / f"{key_id}.pem"
    private = _private_keys().get(key_id)
    if private is None:
        raise ImproperlyConfigured(f"this host holds no private digest key {key_id!r}")
    public_path = directory / f"{key_id}.pub.pem"
    if not public_path.exists():
        public_path.write_text(signing.public_to_pem(private.public_key()))
    path.unlink()
    log.info("retired Ed25519 digest key", extra={"key_id": key_id})
    return path
