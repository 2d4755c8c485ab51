"""The userspace port forwarder (``vms.forwarder``), without guests: its outgoing sockets are
opened in a namespace of the test's own, where echo servers listen on that namespace's loopback
(so traffic never leaves 127.0.0.1 of the host and of that namespace)."""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from vms import forwarder
from vms.network import netns


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def far() -> Iterator[str]:
    name = f"nbf{secrets.token_hex(3)}"
    netns.create(name)  # brings its loopback up
    try:
        yield name
    finally:
        netns.remove(name)


def _echo_servers(ns: str, port: int, stop: threading.Event) -> None:
    """TCP and UDP echo on 127.0.0.1:port inside ``ns`` (sockets made there, served here)."""

    def make() -> tuple[socket.socket, socket.socket]:
        tcp = socket.socket()
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("127.0.0.1", port))
        tcp.listen(8)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", port))
        return tcp, udp

    tcp, udp = netns.call_in(ns, make)
    tcp.settimeout(0.2)
    udp.settimeout(0.2)

    def serve_tcp() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = tcp.accept()
                with conn:
                    conn.sendall(b"tcp:" + conn.recv(100))
        tcp.close()

    def serve_udp() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                data, peer = udp.recvfrom(100)
                udp.sendto(b"udp:" + data, peer)
        udp.close()

    for target in (serve_tcp, serve_udp):
        threading.Thread(target=target, daemon=True).start()


def _wait(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_tcp_and_udp_are_relayed_and_a_removed_port_is_closed(far: str) -> None:
    port = _free_port(socket.SOCK_STREAM)
    stop = threading.Event()
    _echo_servers(far, port, stop)
    fwd = forwarder.Forwarder("127.0.0.1", ipaddress.IPv4Address("127.0.0.1"), far)
    wanted = {("tcp", port), ("udp", port)}
    thread = forwarder.run_thread(fwd, lambda: set(wanted), stop, poll_s=0.05)
    try:
        _wait(lambda: fwd.ports == wanted)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"hello")
            assert sock.recv(100) == b"tcp:hello"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(b"ping", ("127.0.0.1", port))
            assert sock.recv(100) == b"udp:ping"
            sock.sendto(b"again", ("127.0.0.1", port))
            assert sock.recv(100) == b"udp:again"

        wanted.clear()
        _wait(lambda: not fwd.ports)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_a_refused_upstream_closes_the_client_connection(far: str) -> None:
    port = _free_port(socket.SOCK_STREAM)  # nothing listens there in ``far``
    stop = threading.Event()
    fwd = forwarder.Forwarder("127.0.0.1", ipaddress.IPv4Address("127.0.0.1"), far)
    thread = forwarder.run_thread(fwd, lambda: {("tcp", port)}, stop, poll_s=0.05)
    try:
        _wait(lambda: bool(fwd.ports))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.settimeout(5)
            assert sock.recv(100) == b""
    finally:
        stop.set()
        thread.join(10)
