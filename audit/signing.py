"""Ed25519 signatures over digest documents and bundle manifests, without Django.

Shared by the server (``audit.keys``, ``audit.digests``) and the offline verifier
(``audit.offline``), so it must import nothing but the standard library and ``cryptography``.
Public keys travel as base64 of the 32 raw bytes; a key's fingerprint is the SHA-256 of those
bytes in hex, short enough to read over the phone when an auditor pins a key.

Also here, because both verifiers need them: the key history (``key_statement``,
``check_key_history``: which keys a verifier may trust, from what it was told outside the
database or bundle and from rotation statements signed by a trusted key) and the digest chain
link (``document_sha256``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "ED25519",
    "GENESIS_DIGEST",
    "HMAC_SHA256",
    "KEY_ID_RE",
    "KeyHistory",
    "check_key_history",
    "document_sha256",
    "fingerprint",
    "key_statement",
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
KEY_STATEMENT_TYPE = "digest-key"
GENESIS_DIGEST = (
    "0" * 64
)  # prev_digest_sha256 of the first digest; previous statement of the first key


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


def public_is_valid(text: str) -> bool:
    try:
        public_from_b64(text)
    except ValueError:
        return False
    return True


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


def _canonical(value: Any) -> str:
    # The same encoding as audit.hashing.canonical_json (kept free of that module's imports).
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def document_sha256(document: str) -> str:
    """SHA-256 hex of a digest document or key statement's UTF-8 text: the chain link."""
    return hashlib.sha256(document.encode()).hexdigest()


def key_statement(
    *,
    key_id: str,
    public_key: str,
    created_at: str,
    signed_by: str,
    previous_key_id: str,
    previous_statement: str | None,
) -> str:
    """The canonical statement that introduces a key into the history.

    ``previous_statement`` is the text of the previous entry's statement (None for the first
    entry); ``signed_by`` is the previous key for a rotation, or ``key_id`` itself.
    """
    return _canonical(
        {
            "type": KEY_STATEMENT_TYPE,
            "key_id": key_id,
            "algorithm": ED25519,
            "public_key": public_key,
            "fingerprint": fingerprint(public_key),
            "created_at": created_at,
            "signed_by": signed_by,
            "previous_key_id": previous_key_id,
            "previous_statement_sha256": GENESIS_DIGEST
            if previous_statement is None
            else document_sha256(previous_statement),
        }
    )


@dataclass
class KeyHistory:
    """Which keys of a history may be trusted, and everything wrong with it."""

    trusted: dict[str, str] = field(default_factory=dict)  # key id -> base64 public key
    how: dict[str, str] = field(default_factory=dict)  # key id -> why it is trusted
    problems: list[str] = field(default_factory=list)


def check_key_history(
    entries: Iterable[Mapping[str, Any]],
    *,
    configured: Mapping[str, str] | None = None,
    pinned: Iterable[str] = (),
    trust_first: bool = False,
) -> KeyHistory:
    """Check a key history (oldest first) and decide which keys a verifier may trust.

    Each entry has ``key_id``, ``public_key`` (base64), ``fingerprint``, ``statement``,
    ``signed_by`` and ``signature``; an entry with ``"in_history": false`` is a key the server
    knows only from its configuration: outside the chain, trusted only when configured or pinned
    here, and never a problem by itself (a digest it signed is refused if it is not trusted).

    A key is trusted when the verifier's own configuration knows it (``configured``: key id to
    base64 public key, or its fingerprint in ``pinned``), when a key trusted earlier in the
    history signed its statement (a rotation), or, with ``trust_first``, when it is the first
    entry of the history (trust on first use, offline only).
    Never because the history lists it. A key that none of these vouches for, a statement that
    does not match its entry or does not follow the previous one, or a configured key whose
    public half differs from the history's, is a problem: the verifier must fail.
    """
    configured = dict(configured or {})
    pins = {p.lower() for p in pinned}
    out = KeyHistory()
    previous: Mapping[str, Any] | None = None
    seen: set[str] = set()
    index = -1
    for entry in entries:
        key_id = str(entry.get("key_id", ""))
        public = str(entry.get("public_key", ""))
        label = f"key {key_id!r}"
        if entry.get("in_history") is False:
            if configured.get(key_id) == public or (
                public_is_valid(public) and fingerprint(public) in pins
            ):
                out.trusted[key_id] = public
                out.how[key_id] = "configured" if key_id in configured else "pinned"
            continue
        index += 1
        try:
            public_from_b64(public)
        except ValueError as exc:
            out.problems.append(f"{label}: {exc}")
            previous = entry
            continue
        fp = fingerprint(public)
        if key_id in seen:
            out.problems.append(f"{label} appears twice in the key history")
        seen.add(key_id)
        if entry.get("fingerprint") not in (None, fp):
            out.problems.append(f"{label}: the listed fingerprint is not the key's")
        if key_id in configured and configured[key_id] != public:
            out.problems.append(
                f"{label} has fingerprint {fp} in the key history but "
                f"{fingerprint(configured[key_id])} in this verifier's configuration: "
                "the history was rewritten, or hosts hold different keys under one id"
            )
            previous = entry
            continue
        statement = str(entry.get("statement") or "")
        signed_by = str(entry.get("signed_by") or "")
        signature = str(entry.get("signature") or "")
        chained_ok = False
        if statement:
            try:
                doc = json.loads(statement)
            except ValueError:
                doc = None
            expected = None
            if isinstance(doc, dict):
                expected = key_statement(
                    key_id=key_id,
                    public_key=public,
                    created_at=str(doc.get("created_at", "")),
                    signed_by=signed_by,
                    previous_key_id=str(previous.get("key_id", "")) if previous else "",
                    previous_statement=str(previous.get("statement") or "") if previous else None,
                )
            if statement != expected:
                out.problems.append(
                    f"{label}: its statement does not match the entry or does not follow the "
                    "previous key in the history (a key was removed, inserted or rewritten)"
                )
                previous = entry
                continue
            if signed_by == key_id:
                # Self-signed: proves possession only; trust must come from outside.
                if not verify(public, statement, signature):
                    out.problems.append(f"{label}: its own signature of its statement is bad")
                    previous = entry
                    continue
            elif signed_by in out.trusted:
                if not verify(out.trusted[signed_by], statement, signature):
                    out.problems.append(
                        f"{label}: the rotation statement's signature by {signed_by!r} is bad"
                    )
                    previous = entry
                    continue
                chained_ok = True
        if configured.get(key_id) == public:
            out.how[key_id] = "configured"
        elif fp in pins:
            out.how[key_id] = "pinned"
        elif chained_ok:
            out.how[key_id] = f"rotated from {signed_by}"
        elif trust_first and index == 0 and (not statement or signed_by == key_id):
            out.how[key_id] = "first key of the history (trusted on first use)"
        else:
            out.problems.append(
                f"{label} (fingerprint {fp}) is not one you trust: neither configured, nor "
                "pinned, nor introduced by a signature of a trusted key"
            )
            previous = entry
            continue
        out.trusted[key_id] = public
        previous = entry
    for key_id, public in configured.items():
        out.trusted.setdefault(key_id, public)
        out.how.setdefault(key_id, "configured")
    return out
