"""The REST client on its own, against canned raw HTTP answers on a unix socket.

These shapes come from the notes on the released v53 server: CH's errors are JSON arrays of
strings, micro_http's own are ``{"error": ...}`` objects, some are plain text, 503 when too many
connections are open, ``vmm.shutdown`` answers 200 with an empty body (spec: 204). No reference
files are needed here.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vms.hypervisors import chapi
from vms.hypervisors.base import HypervisorError
from vms.hypervisors.chapi import ChApi, ChApiError, ChApiUnavailable, error_message


class CannedServer:
    """Answers each connection with the next canned response and keeps the raw requests."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.responses: list[bytes] = []
        self.requests: list[bytes] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def answer(self, status: str, body: bytes = b"", *, length: bool = True) -> None:
        head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        if length:
            head += f"Content-Length: {len(body)}\r\n"
        self.responses.append(head.encode() + b"\r\n" + body)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(4096)
                head, _, body = data.partition(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        want = int(line.split(b":")[1])
                        while len(body) < want:
                            body += conn.recv(4096)
                self.requests.append(head + b"\r\n\r\n" + body)
                if self.responses:
                    conn.sendall(self.responses.pop(0))
                else:
                    time.sleep(10)  # a wedged VMM

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def server(workdir: Path) -> Iterator[CannedServer]:
    srv = CannedServer(workdir / "api.sock")
    yield srv
    srv.close()


@pytest.fixture
def api(server: CannedServer) -> ChApi:
    return ChApi(server.path, timeout=1.0)


def test_error_array_becomes_the_message_chain(server: CannedServer, api: ChApi) -> None:
    server.answer(
        "500 Internal Server Error", b'["Error from API","Error pausing VM","Already paused"]'
    )
    with pytest.raises(ChApiError) as err:
        api.call("vm.pause")
    assert isinstance(err.value, HypervisorError)
    assert err.value.status == 500
    assert err.value.messages == ["Error from API", "Error pausing VM", "Already paused"]
    assert (
        str(err.value)
        == "vm.pause failed (HTTP 500): Error from API: Error pausing VM: Already paused"
    )


@pytest.mark.parametrize(
    ("body", "messages"),
    [
        (b'{"error": "Invalid header"}', ["Invalid header"]),  # micro_http's own shape
        (b"socket in use", ["socket in use"]),
        (b"", []),
        (b'"just a string"', ["just a string"]),
    ],
)
def test_other_error_shapes_are_parsed(body: bytes, messages: list[str]) -> None:
    assert error_message(body) == messages


def test_empty_error_body_still_names_the_status(server: CannedServer, api: ChApi) -> None:
    server.answer("503 Service Unavailable")
    with pytest.raises(ChApiError, match=r"vm.info failed \(HTTP 503\): Service Unavailable"):
        api.call("vm.info")


def test_bodyless_put_sends_content_length_zero_and_no_body(
    server: CannedServer, api: ChApi
) -> None:
    server.answer("204 No Content", length=False)
    assert api.call("vm.resume") is None
    request = server.requests[0]
    assert request.startswith(b"PUT /api/v1/vm.resume HTTP/1.1\r\n")
    assert b"Content-Length: 0\r\n" in request
    assert request.endswith(b"\r\n\r\n")


def test_put_with_body_sends_json_with_its_length(server: CannedServer, api: ChApi) -> None:
    server.answer("204 No Content", length=False)
    api.call("vm.resize", {"desired_vcpus": 2})
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    assert body == b'{"desired_vcpus": 2}'
    assert b"Content-Type: application/json" in head
    assert f"Content-Length: {len(body)}".encode() in head


def test_vmm_shutdown_accepts_the_released_200_and_the_spec_204(
    server: CannedServer, api: ChApi
) -> None:
    server.answer("200 OK")
    server.answer("204 No Content", length=False)
    api.call("vmm.shutdown")
    api.call("vmm.shutdown")


def test_get_returns_json(server: CannedServer, api: ChApi) -> None:
    server.answer("200 OK", b'{"version": "53.0.0", "pid": 7}')
    assert api.ping() == {"version": "53.0.0", "pid": 7}
    assert server.requests[0].startswith(b"GET /api/v1/vmm.ping HTTP/1.1\r\n")


def test_invalid_json_from_a_get_is_a_hypervisor_error(server: CannedServer, api: ChApi) -> None:
    server.answer("200 OK", b"not json")
    with pytest.raises(HypervisorError, match="invalid JSON"):
        api.info()


def test_unexpected_success_code_is_an_error(server: CannedServer, api: ChApi) -> None:
    server.answer("200 OK", b"{}")
    with pytest.raises(ChApiError, match=r"HTTP 200"):
        api.call("vm.pause")  # v53 answers 204 here; anything else is not success


def test_a_wedged_vmm_times_out(server: CannedServer, api: ChApi) -> None:
    started = time.monotonic()
    with pytest.raises(ChApiUnavailable, match="no answer from the VMM within 1s"):
        api.call("vm.info")
    assert time.monotonic() - started < 3


def test_no_socket_is_unavailable(workdir: Path) -> None:
    with pytest.raises(ChApiUnavailable, match="unreachable"):
        ChApi(workdir / "absent.sock").ping()


def test_descriptors_travel_with_the_first_bytes_of_the_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CH takes SCM_RIGHTS from the read that starts a request: the descriptors go with the
    request line and headers (the first send), never later with the body (a server that has
    read the headers before the body arrives would not see them)."""
    path = tmp_path / "fds.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    received: list[int] = []
    carried: list[bytes] = []
    real_send_fds = socket.send_fds

    def send_fds(sock: socket.socket, buffers: list[bytes], fds: list[int]) -> int:
        carried.append(bytes(buffers[0]))
        return real_send_fds(sock, buffers, fds)

    monkeypatch.setattr(chapi.socket, "send_fds", send_fds)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            data = b""
            while b"}" not in data:
                chunk, ancillary, _flags, _addr = conn.recvmsg(1 << 16, socket.CMSG_SPACE(16))
                data += chunk
                for level, kind, raw in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        for i in range(0, len(raw) - len(raw) % 4, 4):
                            fd = int.from_bytes(raw[i : i + 4], "little", signed=True)
                            received.append(fd)
                            os.close(fd)
            conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    r, w = os.pipe()
    try:
        ChApi(path, timeout=5).call("vm.add-net", {"mac": "52:54:00:00:00:01"}, fds=(r,))
    finally:
        os.close(r)
        os.close(w)
        thread.join(5)
        listener.close()
    assert len(received) == 1
    assert len(carried) == 1 and carried[0].startswith(b"PUT /api/v1/vm.add-net HTTP/1.1")
