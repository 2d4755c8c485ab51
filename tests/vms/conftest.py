"""Fixtures for the VM domain: callers per role, and a worker process for real guests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def caller_for(make_user: Callable[..., Any]) -> Callable[..., Any]:
    from accounts.caller import Caller

    def make(role: str = "operator", **kwargs: Any) -> Caller:
        return Caller.for_user(make_user(role, **kwargs), channel="api")

    return make


@pytest.fixture
def vm_dirs(tmp_path_factory: pytest.TempPathFactory, settings: Any) -> dict[str, Path]:
    """Per-test data dirs; the runtime root is short (unix socket paths are limited)."""
    base = tmp_path_factory.mktemp("vmdata")
    run = Path(f"/tmp/sbx-{os.getpid()}-{int(time.monotonic() * 1000) % 100000}")
    run.mkdir(parents=True, exist_ok=True)
    settings.SANDBOX_RUNTIME_DIR = run
    settings.SANDBOX_SNAPSHOT_DIR = base / "snapshots"
    settings.SANDBOX_VM_DATA_DIR = base / "vms"
    yield {"run": run, "snapshots": base / "snapshots", "vms": base / "vms"}
    # Nothing may be left running: kill what a failed test left, then complain.
    from vms.hypervisors import reconcile as scanner

    report = scanner.scan(run, known_ids=[])
    leftovers = list(report.orphans)
    scanner.teardown_orphans(leftovers)
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    assert not leftovers, f"VMM processes left behind: {[o.pid for o in leftovers]}"


class Worker:
    """``manage.py worker`` in its own session, pointed at the test database."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "worker"],
            cwd=ROOT,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to the cluster's main process only (as ``serve`` does: django-q2's own
        processes must not get it), then SIGKILL to whatever of the group is left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture
def worker_env(vm_dirs: dict[str, Path], settings: Any) -> dict[str, str]:
    from django.db import connection

    env = dict(os.environ)
    db = connection.settings_dict
    if connection.vendor == "postgresql":
        env["DATABASE_URL"] = (
            f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
        )
    else:
        env.pop("DATABASE_URL", None)
        env["SANDBOX_SQLITE_PATH"] = str(db["NAME"])
    env.update(
        SANDBOX_RUNTIME_DIR=str(vm_dirs["run"]),
        SANDBOX_SNAPSHOT_DIR=str(vm_dirs["snapshots"]),
        SANDBOX_VM_DATA_DIR=str(vm_dirs["vms"]),
        SANDBOX_HYPERVISOR="qemu",
        SANDBOX_WORKERS="1",
        SANDBOX_LOG_LEVEL="INFO",
        # No NICs unless a test sets up networking in namespaces of its own (the worker is
        # not "under the tests" for the settings: it must be told).
        SANDBOX_NETWORKING="off",
        # The test's own digest sink (tests/conftest.py): the worker signs digests too.
        SANDBOX_DIGEST_SINK_DIR=str(settings.SANDBOX_DIGEST_SINK_DIR),
    )
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


@pytest.fixture
def worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Worker]:
    w = Worker(worker_env, tmp_path / "worker.log")
    w.start()
    yield w
    w.stop()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def append_lock_held(postgres_only: None, settings: Any) -> Callable[[], Any]:
    """A context manager that holds the event store's append lock from another PostgreSQL
    session, as a stuck writer would: appends in this session time out (within 200 ms here)."""
    import psycopg
    from django.db import connection

    from audit.store import LOCK_SQL

    settings.SANDBOX_EVENT_LOCK_TIMEOUT_MS = 200

    @contextlib.contextmanager
    def held() -> Iterator[None]:
        params = connection.get_connection_params()
        keys = {"host", "port", "user", "password", "dbname"}
        other = psycopg.connect(**{k: v for k, v in params.items() if k in keys})
        try:
            other.execute("BEGIN")
            other.execute(LOCK_SQL)
            yield
        finally:
            other.rollback()
            other.close()

    return held


@pytest.fixture
def make_running_vm(vm_dirs: dict[str, Path]) -> Callable[..., Any]:
    """A VM the read model says is running (no VMM: the guest is a stand-in or unreachable)."""
    from vms import commands
    from vms.models import VirtualMachine

    def make(caller: Any, name: str = "guest") -> Any:
        accepted = commands.create(caller, name=name, template="linux-small")
        commands.record_outcome(accepted.request, "vm.started", {"host": "h", "hypervisor": "qemu"})
        return VirtualMachine.objects.get(pk=accepted.vm_id)

    return make


@pytest.fixture
def kept_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The id of a guest image this host keeps (fabricated in a cache of its own, current): for
    snapshots recorded by hand, which a restore or clone refuses without a kept image."""
    from tests.vms.test_image_contract import build, fabricate, image_id_of

    root = tmp_path / "kept-image-cache"
    root.mkdir()
    monkeypatch.setenv("SANDBOX_IMAGE_CACHE", str(root))
    monkeypatch.delenv("SANDBOX_IMAGE_DIR", raising=False)
    image = fabricate(root, "c000000000000003", b"kept")
    build.point_current(root, image)
    return image_id_of(image)
