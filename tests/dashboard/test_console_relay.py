"""One serial reader per VM for every web process: two web processes (daphne) joined by the Redis
channel layer, the console relay in a real worker process, and browsers' websockets on both.

A real unix socket stands in for QEMU's serial chardev, serving one client at a time as QEMU's
does (a second client waits in the backlog, unserved): a guest would add a boot to the test and
nothing this test looks at. The browser tests run the console against real guests."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from tests.dashboard.conftest import Server
from tests.vms.conftest import Worker, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


class OneClientSerial:
    """A unix socket server that serves one client at a time, like QEMU's serial chardev."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        # The console reads only a socket served by the VMM whose pid is in vmm.pid: here, us.
        (path.parent / "vmm.pid").write_text(f"{os.getpid()}\n")
        self.accepted = 0
        self.received = bytearray()
        self.client: socket.socket | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.client = client
            while data := client.recv(4096):
                self.received += data
            self.client = None
            client.close()

    def output(self, data: bytes) -> None:
        wait_for(lambda: self.client is not None, 10, "a serial client")
        assert self.client is not None
        self.client.sendall(data)

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        if self.client is not None:
            self.client.close()


async def _read_until(ws: Any, needle: bytes, timeout: float = 15.0) -> bytes:
    seen = b""
    async with asyncio.timeout(timeout):
        while needle not in seen:
            frame = await ws.recv()
            if isinstance(frame, bytes):
                seen += frame
    return seen


async def _status_until(ws: Any, predicate: Any, timeout: float = 15.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            frame = await ws.recv()
            if isinstance(frame, str) and predicate(message := json.loads(frame)):
                return message


def _cookie(user: Any) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


def _console_events(vm: Any) -> list[dict[str, Any]]:
    from audit.models import Event

    return [
        {"type": e.type, **e.payload}
        for e in Event.objects.filter(aggregate_id=str(vm.pk), type__startswith="vm.console_")
    ]


def test_two_web_processes_share_one_serial_reader(
    make_user, make_vm, worker_env, vm_dirs, tmp_path
) -> None:
    if not os.environ.get("REDIS_URL"):
        pytest.skip("several web processes need Redis (REDIS_URL)")
    from websockets.asyncio.client import connect

    from vms import runtime

    owner, viewer = make_user("operator"), make_user("viewer")
    vm = make_vm(owner)
    serial = OneClientSerial(runtime.runtime_dir(vm.pk).serial_socket)
    env = dict(worker_env, SANDBOX_CONSOLE_DIR=str(tmp_path / "console"))
    env["DJANGO_SETTINGS_MODULE"] = "tests.dashboard.settings"
    worker = Worker(env, tmp_path / "worker.log")
    worker.start()
    servers = [Server(env, tmp_path / f"web{i}.log") for i in (1, 2)]
    try:
        for server in servers:
            server.wait_ready()
        a, b = servers
        path = f"/ws/vms/{vm.pk}/console/"

        cookies = {owner.pk: _cookie(owner), viewer.pk: _cookie(viewer)}

        def ws_for(server: Server, user: Any) -> Any:
            return connect(
                server.url.replace("http", "ws") + path,
                additional_headers={
                    "Origin": server.url,
                    "Cookie": f"sessionid={cookies[user.pk]}",
                },
            )

        async def scenario() -> None:
            async with ws_for(a, owner) as typist, ws_for(b, viewer) as watcher:
                for sock in (typist, watcher):
                    await _status_until(sock, lambda m: m["type"] == "session")
                    await _status_until(sock, lambda m: m["type"] == "link" and m["connected"])
                await asyncio.to_thread(serial.output, b"hello from the guest\r\n# ")
                await _read_until(typist, b"hello from the guest")
                await _read_until(watcher, b"hello from the guest")

                await typist.send(b"echo typed\r")
                await asyncio.to_thread(
                    wait_for, lambda: b"echo typed\r" in serial.received, 10, "the keystrokes"
                )
                await asyncio.to_thread(serial.output, b"echo typed\r\ntyped\r\n# ")
                await _read_until(watcher, b"typed\r\n")
                await _read_until(typist, b"typed\r\n")

                # A late joiner on the other process first gets the scrollback.
                async with ws_for(b, owner) as late:
                    await _read_until(late, b"hello from the guest")

        asyncio.run(scenario())
        assert serial.accepted == 1, "more than one serial connection for one VM"
        assert bytes(serial.received) == b"echo typed\r"

        # Each session is recorded once, by the process that served it.
        def closed() -> list[dict[str, Any]]:
            events = [e for e in _console_events(vm) if e["type"] == "vm.console_closed"]
            return events if len(events) == 3 else []

        ends = wait_for(closed, 20, "three closed console sessions")
        recordings = [(tmp_path / "console" / e["recording"]).read_text() for e in ends]
        assert len({e["recording"] for e in ends}) == 3
        for text in recordings:
            assert "hello from the guest" in text
        assert sum('"i", "echo typed\\r"' in text for text in recordings) == 1
    finally:
        for server in servers:
            server.stop()
        worker.stop()
        serial.close()
