"""The signing secrets of webhooks and the signature every delivery carries.

A secret is ``whsec_`` and 32 random bytes in URL-safe base64, made by the server and shown
once. A delivery's ``Sandbox-Signature`` header is ``t=<unix seconds>,v1=<hex>`` where the hex
is HMAC-SHA256 keyed with the secret's text (UTF-8) over ``f"{t}."`` followed by the exact body
bytes; while a rotated-out secret is still in its grace period, a second ``v1=`` is made with
it, so a receiver may switch secrets at its own pace. docs/webhooks.md has the receiver's side.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from collections.abc import Sequence

__all__ = ["PREFIX", "SIGNATURE_HEADER", "new_secret", "sign", "signature_header", "verify"]

PREFIX = "whsec_"
SIGNATURE_HEADER = "Sandbox-Signature"


def new_secret() -> str:
    return PREFIX + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


def sign(secret: str, timestamp: int, body: bytes) -> str:
    message = f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secrets: Sequence[str], body: bytes, timestamp: int | None = None) -> str:
    """``t=...,v1=...`` with one ``v1`` per secret (the current one first)."""
    t = int(time.time()) if timestamp is None else timestamp
    return ",".join([f"t={t}", *(f"v1={sign(s, t, body)}" for s in secrets)])


def verify(secret: str, body: bytes, header: str, *, tolerance_s: int = 300) -> bool:
    """What a receiver does (docs/webhooks.md shows the same in a page of its own)."""
    pairs = [part.split("=", 1) for part in header.split(",") if "=" in part]
    stamps = [v for k, v in pairs if k.strip() == "t"]
    signatures = [v for k, v in pairs if k.strip() == "v1"]
    if len(stamps) != 1 or not stamps[0].isdigit() or not signatures:
        return False
    t = int(stamps[0])
    if abs(time.time() - t) > tolerance_s:
        return False
    expected = sign(secret, t, body)
    return any(hmac.compare_digest(expected, s.strip()) for s in signatures)
