"""The SDK and the CLI against the product served for real (``manage.py serve`` on the test
database) with a real worker process and real QEMU guests: only the public API in between."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.served import Served

# The VM domain's fixtures: per-test data dirs and a worker process pointed at the test database.
from tests.vms.conftest import vm_dirs, worker, worker_env  # noqa: F401


@pytest.fixture
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    """The web tier, with the worker's directories (exec and files reach the guests from it)."""
    env: dict[str, str] = request.getfixturevalue("worker_env")
    keys = (
        "SANDBOX_RUNTIME_DIR",
        "SANDBOX_SNAPSHOT_DIR",
        "SANDBOX_VM_DATA_DIR",
        "SANDBOX_HYPERVISOR",
        "SANDBOX_NETWORKING",
        "SANDBOX_DIGEST_SINK_DIR",
    )
    server = Served(tmp_path / "serve.log", **{k: env[k] for k in keys})
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture
def sdk_env(served: Served, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """``SANDBOX_URL`` set to the server, a config dir of the test's own, no token yet."""
    monkeypatch.setenv("SANDBOX_URL", served.url)
    monkeypatch.delenv("SANDBOX_TOKEN", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return served
