"""QMPClient against a scripted fake QMP server (no QEMU needed): ids, events, errors, timeouts."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vms.hypervisors.qmp import QMPClient, QMPError, QMPTimeout

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}


@pytest.fixture
def fake_qmp(tmp_path: Path) -> Iterator[Callable[[Callable[[dict], list[dict]]], Path]]:
    """Serve one client; ``script(request) -> messages`` decides what QEMU sends back."""
    threads: list[threading.Thread] = []
    servers: list[socket.socket] = []

    def start(script: Callable[[dict], list[dict]]) -> Path:
        path = tmp_path / f"q{len(servers)}.sock"
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(path))
        srv.listen(1)
        servers.append(srv)

        def serve() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.sendall(json.dumps(GREETING).encode() + b"\r\n")
                buf = b""
                while True:
                    data = conn.recv(4096)
                    if not data:
                        return
                    buf += data
                    while b"\n" in buf:
                        line, _, buf = buf.partition(b"\n")
                        req = json.loads(line)
                        for msg in script(req):
                            conn.sendall(json.dumps(msg).encode() + b"\r\n")

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        threads.append(t)
        return path

    yield start
    for srv in servers:
        srv.close()
    for t in threads:
        t.join(timeout=2)


def test_reply_is_matched_by_id_across_interleaved_events(fake_qmp) -> None:  # noqa: ANN001
    def script(req: dict) -> list[dict]:
        if req["execute"] == "qmp_capabilities":
            return [{"return": {}, "id": req["id"]}]
        return [
            {"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}},
            {"return": {"stale": True}, "id": "not-this-one"},
            {"return": {"status": "paused"}, "id": req["id"]},
        ]

    with QMPClient.connect(fake_qmp(script), timeout=2) as qmp:
        assert qmp.execute("query-status") == {"status": "paused"}
        assert [e["event"] for e in qmp.events] == ["STOP"]
        assert qmp.wait_event("STOP", timeout=0.1)["event"] == "STOP"


def test_error_reply_raises_qmp_error_with_class(fake_qmp) -> None:  # noqa: ANN001
    def script(req: dict) -> list[dict]:
        if req["execute"] == "qmp_capabilities":
            return [{"return": {}, "id": req["id"]}]
        return [{"error": {"class": "GenericError", "desc": "nope"}, "id": req["id"]}]

    with QMPClient.connect(fake_qmp(script), timeout=2) as qmp:
        with pytest.raises(QMPError, match="GenericError: nope") as info:
            qmp.execute("cont")
        assert info.value.klass == "GenericError"


def test_silence_gives_a_timeout_not_a_hang(fake_qmp) -> None:  # noqa: ANN001
    def script(req: dict) -> list[dict]:
        if req["execute"] == "qmp_capabilities":
            return [{"return": {}, "id": req["id"]}]
        return []

    with QMPClient.connect(fake_qmp(script), timeout=2) as qmp:
        started = time.monotonic()
        with pytest.raises(QMPTimeout):
            qmp.execute("query-status", timeout=0.3)
        assert time.monotonic() - started < 2
