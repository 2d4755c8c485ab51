"""API token secrets: generation, parsing and peppered HMAC digests.

A token is ``sbx_<key>_<secret>``: ``key`` (12 characters) is public and indexes the row; the
secret is only ever stored as HMAC-SHA256(pepper, secret), with the pepper's version kept on the
row so that peppers can be rotated without invalidating tokens: a token hashed with an older
pepper is re-hashed with the current one at its next use (``accounts.commands.rehash_token``),
and refused once that pepper is retired (docs/security.md, "Key rotation").
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string

from django.conf import settings

from core import keyfiles

PREFIX = "sbx"
_ALPHABET = string.ascii_lowercase + string.digits
TOKEN_RE = re.compile(r"^sbx_([a-z0-9]{12})_([A-Za-z0-9_-]{43})$")


def generate() -> tuple[str, str, str]:
    """(key, secret, full token)."""
    key = "".join(secrets.choice(_ALPHABET) for _ in range(12))
    secret = secrets.token_urlsafe(32)  # 43 characters
    return key, secret, f"{PREFIX}_{key}_{secret}"


def parse(token: str) -> tuple[str, str] | None:
    match = TOKEN_RE.match(token)
    return (match.group(1), match.group(2)) if match else None


def digest(secret: str, pepper_version: int) -> str:
    pepper = settings.SANDBOX_TOKEN_PEPPERS[pepper_version]
    return hmac.new(pepper.encode(), secret.encode(), hashlib.sha256).hexdigest()


def pepper_key_id(version: int) -> str:
    """The key id of a pepper version, as events and commands name it (``v2``)."""
    return keyfiles.TOKEN_PEPPER.key_id(version)


def pepper_retired(pepper_version: int) -> bool:
    return pepper_version not in settings.SANDBOX_TOKEN_PEPPERS


def matches(secret: str, stored_digest: str, pepper_version: int) -> bool:
    if pepper_version not in settings.SANDBOX_TOKEN_PEPPERS:
        return False
    return hmac.compare_digest(digest(secret, pepper_version), stored_digest)
