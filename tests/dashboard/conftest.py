"""Fixtures for the dashboard: logged-in websocket communicators, a VM record, and a fake serial
socket standing in for QEMU's (the browser tests use real guests instead)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.test import Client


@pytest.fixture
def short_run_dir(settings: Any) -> Iterator[Path]:
    """A runtime root short enough for unix socket paths (107 bytes)."""
    run = Path(f"/tmp/sbxd-{os.getpid()}-{int(time.monotonic() * 1000) % 100000}")
    run.mkdir(parents=True)
    settings.SANDBOX_RUNTIME_DIR = run
    yield run
    shutil.rmtree(run, ignore_errors=True)


@pytest.fixture
def console_dir(settings: Any, tmp_path: Path) -> Path:
    settings.SANDBOX_CONSOLE_DIR = tmp_path / "console"
    return settings.SANDBOX_CONSOLE_DIR


@pytest.fixture
async def live_stopped(transactional_db: Any) -> AsyncIterator[None]:
    """Stop the log follower and close the consumers' database connection (both would keep the
    test database in use) before the database is flushed."""
    yield
    from channels.db import database_sync_to_async
    from django.db import connections

    from vms import live

    live.stop_follower()
    # database_sync_to_async runs in one shared thread: close that thread's connection.
    await database_sync_to_async(connections.close_all)()


@pytest.fixture
def make_vm(transactional_db: Any) -> Callable[..., Any]:
    from accounts.caller import Caller
    from vms import commands

    def make(owner: Any, name: str = "vm1") -> Any:
        caller = Caller.for_user(owner, channel="api")
        return commands.create(caller, name=name, template="linux-small", start_now=False).vm

    return make


@pytest.fixture
def ws_connect() -> Callable[..., Any]:
    """A communicator on the real ASGI application (origin check, session auth, routing)."""
    from channels.db import database_sync_to_async

    from sandbox_site.asgi import application

    def session_cookie(user: Any) -> str:
        client = Client()
        client.force_login(user)
        return client.cookies["sessionid"].value

    async def connect(path: str, user: Any | None = None) -> WebsocketCommunicator:
        headers = [(b"origin", b"http://127.0.0.1")]
        if user is not None:
            cookie = await database_sync_to_async(session_cookie)(user)
            headers.append((b"cookie", f"sessionid={cookie}".encode()))
        return WebsocketCommunicator(application, path, headers=headers)

    return connect


class FakeSerial:
    """A unix socket server where QEMU's console.sock would be: it records what it receives and
    can write output as the guest would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received = bytearray()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.AbstractServer | None = None
        self.connections = 0

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.server = await asyncio.start_unix_server(self._client, path=str(self.path))
        # The console reads only a socket served by the VMM whose pid is in vmm.pid: here, us.
        (self.path.parent / "vmm.pid").write_text(f"{os.getpid()}\n")

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        while data := await reader.read(4096):
            self.received += data
        self.writers.remove(writer)
        writer.close()

    async def output(self, data: bytes) -> None:
        for w in self.writers:
            w.write(data)
            await w.drain()

    async def wait_connected(self, timeout: float = 3.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.writers:
            assert asyncio.get_running_loop().time() < deadline, "the hub never connected"
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        for w in list(self.writers):
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def fake_serial(short_run_dir: Path) -> AsyncIterator[Callable[..., Any]]:
    from vms import runtime

    started: list[FakeSerial] = []

    async def start(vm: Any) -> FakeSerial:
        serial = FakeSerial(runtime.runtime_dir(vm.pk).serial_socket)
        await serial.start()
        started.append(serial)
        return serial

    yield start
    for serial in started:
        await serial.close()


# --- A real server and real browsers (browser tests) ----------------------------------------------

from tests.vms import conftest as _vms  # noqa: E402

# The VM suite's fixtures (a worker process on the test database, per-test VM dirs).
vm_dirs, worker, worker_env, wait_for = _vms.vm_dirs, _vms.worker, _vms.worker_env, _vms.wait_for

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "dashboard"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """daphne serving sandbox_site.asgi on 127.0.0.1, in its own session, on the test database."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        import subprocess
        import sys

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port),
             "sandbox_site.asgi:application"],
            cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 30.0) -> None:
        import urllib.request

        def up() -> bool:
            assert self.proc.poll() is None, f"daphne exited: {self.log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as r:  # noqa: S310
                    return r.status == 200
            except OSError:
                return False

        wait_for(up, timeout, "the ASGI server to answer", interval=0.2)

    def stop(self) -> None:
        import signal
        import subprocess

        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def guest_image() -> None:
    import shutil as sh

    from vms import images

    if sh.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    images.ensure_built()


@pytest.fixture
def asgi_server(guest_image: None, web_server: Server) -> Server:
    """The server, on a machine that can boot the guests it is asked to start."""
    return web_server


@pytest.fixture
def web_server(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Server]:
    """daphne on the test database, for pages that need no running guest."""
    env = dict(worker_env)
    env["DJANGO_SETTINGS_MODULE"] = "tests.dashboard.settings"
    env["SANDBOX_TESTING"] = "1"  # the test hashers, so users made by the test can log in
    env["SANDBOX_CONSOLE_DIR"] = str(tmp_path / "console")
    server = Server(env, tmp_path / "daphne.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """Headless Chromium sessions (a fresh profile each); all quit at teardown."""
    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        pytest.skip("chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers: list[Any] = []

    def make() -> Any:
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for arg in (
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-component-update", "--no-first-run",
            "--disable-sync", "--window-size=1360,1000",
            f"--user-data-dir={tmp_path / f'chromium-{len(drivers)}'}",
        ):  # fmt: skip
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(10)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        with contextlib.suppress(Exception):
            driver.quit()
