"""Encryption at rest (AES-256-GCM under keys with ids) and the HMAC fingerprint of a value.

``SANDBOX_SECRETS_KEYS`` is ``"id:base64key,..."``: 32-byte keys, the first is the current one
(new values and re-encryption use it), the others are still readable until removed from the
setting (retired). Each stored value keeps the id of its key and a fresh 96-bit nonce; the
associated data binds the ciphertext to its secret and version, so a ciphertext copied onto
another row, or another version, does not decrypt.

The fingerprint is HMAC-SHA256 of the value under ``SANDBOX_SECRETS_HMAC_KEY``, a key used for
nothing else: it is what events record about a value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass
from functools import cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

__all__ = [
    "Keyring",
    "Sealed",
    "UnknownKey",
    "DecryptionFailed",
    "fingerprint",
    "keyring",
    "parse_keys",
]

KEY_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class UnknownKey(Exception):
    """A value is encrypted under a key that is not (or no longer) configured: retired."""


class DecryptionFailed(Exception):
    """The ciphertext does not authenticate under its key (tampered, or bound elsewhere)."""


@dataclass(frozen=True, slots=True)
class Sealed:
    key_id: str
    nonce: bytes
    ciphertext: bytes


def _decode_key(text: str) -> bytes:
    text = text.strip()
    padded = text + "=" * (-len(text) % 4)
    try:
        raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImproperlyConfigured("SANDBOX_SECRETS_KEYS: a key is not valid base64") from exc
    if len(raw) != 32:
        raise ImproperlyConfigured(
            f"SANDBOX_SECRETS_KEYS: a key must be 32 bytes (AES-256), not {len(raw)}"
        )
    return raw


def parse_keys(spec: str) -> list[tuple[str, bytes]]:
    """``"id:base64key,..."`` -> [(id, key)], the current first. ImproperlyConfigured on a
    malformed entry, a repeated id, or none at all."""
    keys: list[tuple[str, bytes]] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        key_id, sep, material = entry.partition(":")
        key_id = key_id.strip()
        if not sep or not key_id or len(key_id) > 32 or set(key_id) - KEY_ID_CHARS:
            raise ImproperlyConfigured(
                "SANDBOX_SECRETS_KEYS: each entry is id:base64key, the id of 1 to 32 letters, "
                "digits, '-', '_' or '.'"
            )
        if any(k == key_id for k, _ in keys):
            raise ImproperlyConfigured(f"SANDBOX_SECRETS_KEYS: key id {key_id!r} given twice")
        keys.append((key_id, _decode_key(material)))
    if not keys:
        raise ImproperlyConfigured("SANDBOX_SECRETS_KEYS names no key")
    return keys


class Keyring:
    """The configured keys: the current one seals, any of them opens."""

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        self.current_id = keys[0][0]
        self._keys = {key_id: AESGCM(key) for key_id, key in keys}

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    def seal(self, plaintext: bytes, aad: bytes) -> Sealed:
        nonce = os.urandom(12)
        ciphertext = self._keys[self.current_id].encrypt(nonce, plaintext, aad)
        return Sealed(self.current_id, nonce, ciphertext)

    def open(self, sealed: Sealed, aad: bytes) -> bytes:
        aead = self._keys.get(sealed.key_id)
        if aead is None:
            raise UnknownKey(f"the key {sealed.key_id!r} is not configured (retired?)")
        try:
            return aead.decrypt(sealed.nonce, sealed.ciphertext, aad)
        except InvalidTag as exc:
            raise DecryptionFailed("the stored value does not authenticate") from exc


@cache
def _keyring(spec: str) -> Keyring:
    return Keyring(parse_keys(spec))


def keyring() -> Keyring:
    """The keyring of the current settings (parsed once per distinct setting)."""
    return _keyring(settings.SANDBOX_SECRETS_KEYS)


def fingerprint(value: bytes) -> str:
    """HMAC-SHA256 of ``value`` under the dedicated audit key, hex."""
    key = settings.SANDBOX_SECRETS_HMAC_KEY.encode()
    return hmac.new(key, value, hashlib.sha256).hexdigest()
