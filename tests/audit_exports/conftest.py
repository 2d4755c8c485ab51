"""Fixtures for the auditor exports: isolated key and export directories, the auditor URLs,
and a realistic mix of events recorded through the real command functions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.audit_exports.mix import Mix, record_mix


@pytest.fixture(autouse=True)
def _isolated_dirs(settings: Any, tmp_path: Path) -> None:
    settings.SANDBOX_AUDIT_EXPORT_DIR = tmp_path / "exports"
    settings.SANDBOX_DIGEST_ED25519_DIR = tmp_path / "keys"
    settings.SANDBOX_DIGEST_ED25519_KEYS = ""
    settings.SANDBOX_DIGEST_ED25519_PUBLIC_KEYS = ""
    settings.SANDBOX_DIGEST_ED25519_CURRENT = "ed25519-1"
    settings.SANDBOX_DIGEST_ALGORITHM = "ed25519"
    settings.ROOT_URLCONF = "tests.audit_exports.urls"


@pytest.fixture
def mix(make_user: Callable[..., Any], db: Any) -> Mix:
    return record_mix(make_user)
