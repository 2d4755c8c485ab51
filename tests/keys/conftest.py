"""Control-plane key rotation: each test keeps its keys in a directory of its own, and
``restart`` reads them as a process does when it starts (``tests.keyrotation``)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

from tests.keyrotation import restart_processes, use_own_secrets


@pytest.fixture
def secrets_dir(settings: Any, tmp_path: Path) -> Path:
    return use_own_secrets(settings, tmp_path / "secrets")


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
