"""Fixtures for the VM domain: callers per role, and a worker process for real guests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


@dataclass
class NetHost:
    """Sandbox networking in namespaces of a test's own (``net_host``): the product namespace
    ``netns`` (made by whoever sets networking up: a worker, or ``vmnet.setup()``), the
    namespace ``host_ns`` standing in for the host, the resolvers' ``run_dir``, and the
    settings given (``env``, for a worker's environment)."""

    netns: str
    host_ns: str
    run_dir: Path
    env: dict[str, str]

    def links(self) -> str:
        return _out(["ip", "-n", self.netns, "-br", "link"])

    def ruleset(self) -> str:
        return _out(["ip", "netns", "exec", self.netns, "nft", "list", "ruleset"])


def _out(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout


@pytest.fixture
def net_host(settings: Any) -> Iterator[NetHost]:
    """Networking on, in namespaces named per run: this process's settings point at them (and
    ``env`` holds them for a worker); afterwards the resolvers, the product namespace (made by
    the test or its worker) and the host's stand-in are removed, even on failure."""
    import secrets
    import shutil
    import tempfile

    from tests.network.internet import INTERNET_DNS, UPLINK
    from vms.network import netns

    if os.geteuid() != 0:
        pytest.fail("the networking tests need root (network namespaces, nftables)")
    tag = secrets.token_hex(3)
    name, host_ns = f"nbw{tag}", f"nbx{tag}"
    link = f"10.254.{secrets.randbelow(256)}.{4 * secrets.randbelow(64)}/30"
    run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    env = {
        "SANDBOX_NETWORKING": "on",
        "SANDBOX_NETNS": name,
        "SANDBOX_NET_HOST_LINK": link,
        "SANDBOX_NET_HOST_NS": host_ns,
        "SANDBOX_NET_RUN_DIR": str(run_dir),
        "SANDBOX_NETNS_KEEP": "0",
        # The test's "internet" (tests.network.internet), attached by the tests that need it.
        "SANDBOX_NET_UPLINK": UPLINK,
        "SANDBOX_NET_DNS": str(INTERNET_DNS),
        # The worker's scheduled evidence collection stays out of the tests' way (an hourly
        # schedule): a test collects when it has made its traffic, so one period holds all.
        "SANDBOX_NET_EVIDENCE_PERIOD_S": "3600",
    }
    for key, value in env.items():
        setattr(settings, key, value)
    settings.SANDBOX_NETNS_KEEP = False
    settings.SANDBOX_NET_EVIDENCE_PERIOD_S = 3600
    netns.create(host_ns)
    try:
        yield NetHost(name, host_ns, run_dir, env)
    finally:
        for pidfile in run_dir.glob("dns-*.pid"):
            with contextlib.suppress(Exception):
                os.kill(int(pidfile.read_text()), 9)
        with contextlib.suppress(Exception):
            netns.teardown(name)
        netns.remove(host_ns)
        shutil.rmtree(run_dir, ignore_errors=True)
    assert not netns.exists(name) and not netns.exists(host_ns)


@pytest.fixture
def pool_env(vm_dirs: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """For warm pools on real guests: the guest image, and the worker's tasks recorded (a test
    runs the refill itself)."""
    import django_q.tasks

    from vms import enqueue, images

    image = images.ensure_built()
    monkeypatch.setenv("SANDBOX_IMAGE_DIR", str(image.directory))
    queued: list[str] = []

    def record(func: str, *args: Any, **kwargs: Any) -> None:
        queued.append(func)

    monkeypatch.setattr(django_q.tasks, "async_task", record)
    monkeypatch.setattr(enqueue, "async_task", record)
    return queued
