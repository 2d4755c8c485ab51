"""Control-plane key rotation: each test keeps its keys in a directory of its own, and
``restart`` reads them as a process does when it starts (``sandbox_site.settings``)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

from core import keyfiles


@pytest.fixture
def secrets_dir(settings: Any, tmp_path: Path) -> Path:
    """Keys generated as at a first start, in this test's own secrets directory."""
    settings.SANDBOX_SECRETS_DIR = tmp_path / "secrets"
    settings.SANDBOX_DIGEST_ED25519_DIR = tmp_path / "secrets" / "ed25519"
    settings.SANDBOX_DIGEST_ED25519_KEYS = ""
    settings.SANDBOX_DIGEST_ED25519_PUBLIC_KEYS = ""
    settings.SANDBOX_DIGEST_TRUSTED_FINGERPRINTS = ""
    settings.SANDBOX_DIGEST_ED25519_CURRENT = ""  # the newest numbered key in the directory
    restart_processes(settings)
    return settings.SANDBOX_SECRETS_DIR


def restart_processes(settings: Any) -> None:
    """What a restart does: the settings' versioned keys read again from the secrets directory,
    through the same functions and rules as ``sandbox_site.settings``."""
    directory = settings.SANDBOX_SECRETS_DIR
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_TOKEN_PEPPER")}
    environ.pop("DJANGO_SECRET_KEY", None)
    environ.pop("SANDBOX_DIGEST_HMAC_KEY", None)
    peppers = keyfiles.load(keyfiles.TOKEN_PEPPER, directory, environ)
    settings.SANDBOX_TOKEN_PEPPERS = peppers
    settings.SANDBOX_TOKEN_PEPPER_CURRENT = max(peppers)
    django = keyfiles.load(keyfiles.DJANGO_SECRET, directory, environ)
    settings.SECRET_KEY, settings.SECRET_KEY_FALLBACKS = keyfiles.current_and_older(django)
    hmac = keyfiles.load(keyfiles.DIGEST_HMAC, directory, environ)
    settings.SANDBOX_DIGEST_HMAC_KEYS = {keyfiles.DIGEST_HMAC.key_id(v): k for v, k in hmac.items()}
    settings.SANDBOX_DIGEST_HMAC_CURRENT = keyfiles.DIGEST_HMAC.key_id(max(hmac))


@pytest.fixture
def restart(settings: Any) -> Callable[[], None]:
    return lambda: restart_processes(settings)


@pytest.fixture
def manage() -> Callable[..., str]:
    """Run a management command; its output (CommandError propagates)."""

    def run(*args: str) -> str:
        out = io.StringIO()
        call_command(*args, stdout=out, stderr=io.StringIO())
        return out.getvalue()

    return run
