"""Ed25519 signatures over digest documents and bundle manifests, without Django.

Shared by the server (``audit.keys``, ``audit.digests``) and the offline verifier
(``audit.offline``), so it must import nothing but the standard library and ``cryptography``.
Public keys travel as base64 of the 32 raw bytes; a key's fingerprint is the SHA-256 of those
bytes in hex, short enough to read over the phone when an auditor pins a key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "ED25519",
    "HMAC_SHA256",
    "KEY_ID_RE",
    "fingerprint",
    "private_from_text",
    "private_to_pem",
    "public_b64",
    "public_from_b64",
    "public_to_pem",
    "sign",
    "verify",
]

ED25519 = "ed25519"
HMAC_SHA256 = "hmac-sha256"
KEY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def public_b64(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def public_from_b64(text: str) -> Ed25519PublicKey:
    """A public key from base64 of its 32 raw bytes; ValueError when it is not one."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("public key is not base64") from exc
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, not {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def fingerprint(public: str | Ed25519PublicKey) -> str:
    """SHA-256 hex of the raw public key bytes."""
    text = public if isinstance(public, str) else public_b64(public)
    return hashlib.sha256(base64.b64decode(text)).hexdigest()


def private_from_text(text: str) -> Ed25519PrivateKey:
    """A private key from PEM (PKCS#8) or base64 of the 32-byte seed; ValueError otherwise."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        key = serialization.load_pem_private_key(text.encode(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the PEM key is not an Ed25519 private key")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("private key is neither PEM nor base64") from exc
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 seed has 32 bytes, not {len(raw)}")
    return Ed25519PrivateKey.from_private_bytes(raw)


def private_to_pem(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def public_to_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def sign(key: Ed25519PrivateKey, message: str | bytes) -> str:
    data = message.encode() if isinstance(message, str) else message
    return base64.b64encode(key.sign(data)).decode()


def verify(public: str | Ed25519PublicKey, message: str | bytes, signature: str) -> bool:
    """True when ``signature`` (base64) is valid for ``message`` under ``public``."""
    try:
        key = public_from_b64(public) if isinstance(public, str) else public
        sig = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return False
    data = message.encode() if isinstance(message, str) else message
    try:
        key.verify(sig, data)
    except InvalidSignature:
        return False
    return True
