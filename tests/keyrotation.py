"""Test helpers for control-plane keys: a secrets directory of the test's own, and a "restart"
that reads the versioned keys from it as ``sandbox_site.settings`` does when a process starts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from core import keyfiles


def use_own_secrets(settings: Any, directory: Path) -> Path:
    """Keys generated as at a first start, in ``directory``; Ed25519 digest keys beside them,
    the signing one chosen as the product does (the newest numbered key there)."""
    settings.SANDBOX_SECRETS_DIR = directory
    settings.SANDBOX_DIGEST_ED25519_DIR = directory / "ed25519"
    settings.SANDBOX_DIGEST_ED25519_KEYS = ""
    settings.SANDBOX_DIGEST_ED25519_PUBLIC_KEYS = ""
    settings.SANDBOX_DIGEST_TRUSTED_FINGERPRINTS = ""
    settings.SANDBOX_DIGEST_ED25519_CURRENT = ""
    restart_processes(settings)
    return directory


def restart_processes(settings: Any) -> None:
    """What a restart does to the settings' versioned keys, through the functions and rules of
    ``sandbox_site.settings`` (the environment of this test run left out)."""
    directory = settings.SANDBOX_SECRETS_DIR
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SANDBOX_TOKEN_PEPPER", "DJANGO_SECRET_KEY", "SANDBOX_DIGEST_HMAC"))
    }
    peppers = keyfiles.load(keyfiles.TOKEN_PEPPER, directory, environ)
    settings.SANDBOX_TOKEN_PEPPERS = peppers
    settings.SANDBOX_TOKEN_PEPPER_CURRENT = max(peppers)
    django = keyfiles.load(keyfiles.DJANGO_SECRET, directory, environ)
    settings.SECRET_KEY, settings.SECRET_KEY_FALLBACKS = keyfiles.current_and_older(django)
    hmac = keyfiles.load(keyfiles.DIGEST_HMAC, directory, environ)
    settings.SANDBOX_DIGEST_HMAC_KEYS = {keyfiles.DIGEST_HMAC.key_id(v): k for v, k in hmac.items()}
    settings.SANDBOX_DIGEST_HMAC_CURRENT = keyfiles.DIGEST_HMAC.key_id(max(hmac))
