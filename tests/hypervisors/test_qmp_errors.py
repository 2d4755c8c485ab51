"""QMPClient turns a VMM that goes away mid-session into QMPConnectionLost, never an OSError."""

from __future__ import annotations

import json
import select
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vms.hypervisors.base import HypervisorError
from vms.hypervisors.qmp import QMPClient, QMPConnectionLost

GREETING = {"QMP": {"version": {}, "capabilities": []}}


def _negotiate(conn: socket.socket) -> None:
    conn.sendall(json.dumps(GREETING).encode() + b"\n")
    buf = b""
    while b"\n" not in buf:
        buf += conn.recv(4096)
    req = json.loads(buf.partition(b"\n")[0])
    conn.sendall(json.dumps({"return": {}, "id": req["id"]}).encode() + b"\n")


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Iterator[Callable[[Callable[[socket.socket], None]], Path]]:
    """A one-client QMP server that negotiates, then hands the connection to ``then``."""
    threads: list[threading.Thread] = []
    servers: list[socket.socket] = []

    def start(then: Callable[[socket.socket], None]) -> Path:
        path = tmp_path / "qmp.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(1)
        servers.append(server)

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                _negotiate(conn)
                then(conn)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return path

    yield start
    for thread in threads:
        thread.join(5)
    for server in servers:
        server.close()


def test_a_vmm_dying_with_our_command_unread_is_connection_lost(fake_qemu) -> None:  # noqa: ANN001
    # Closing a unix socket with unread data resets the peer (ECONNRESET), as QEMU's abort in
    # the middle of a device_add does (it leaves the command's trailing newline unread).
    def die_with_data_unread(conn: socket.socket) -> None:
        select.select([conn], [], [], 5)

    path = fake_qemu(die_with_data_unread)
    with QMPClient.connect(path, timeout=5) as qmp:
        with pytest.raises(QMPConnectionLost, match="reset") as caught:
            qmp.execute("device_add", {"driver": "qemu64-x86_64-cpu"})
    assert isinstance(caught.value, HypervisorError)
    assert isinstance(caught.value.__cause__, ConnectionResetError)


def test_a_vmm_closing_after_reading_the_command_is_connection_lost(fake_qemu) -> None:  # noqa: ANN001
    def read_then_close(conn: socket.socket) -> None:
        buf = b""
        while b"\n" not in buf:
            buf += conn.recv(4096)

    path = fake_qemu(read_then_close)
    with QMPClient.connect(path, timeout=5) as qmp:
        with pytest.raises(QMPConnectionLost, match="closed"):
            qmp.execute("query-status")


def test_writing_to_a_vmm_that_is_gone_is_connection_lost(fake_qemu) -> None:  # noqa: ANN001
    gone = threading.Event()

    def close_at_once(conn: socket.socket) -> None:
        conn.shutdown(socket.SHUT_RDWR)
        gone.set()

    path = fake_qemu(close_at_once)
    with QMPClient.connect(path, timeout=5) as qmp:
        assert gone.wait(5)
        with pytest.raises(QMPConnectionLost):
            # The first write may still land in the buffer; the read or a later write fails.
            for _ in range(3):
                qmp.execute("query-status")
