"""The web process's connections to guests (``sandbox_site.upstream``), without guests: they are
opened in the namespace named by ``SANDBOX_NET_HOST_NS`` (one of the test's own, where a
stand-in server listens on that namespace's loopback), or in the process's own when it is empty.
The end-to-end path, with real guests behind the worker's host link, is in
tests/vms/test_network_worker.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sandbox_site import upstream
from vms.network import netns

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nthere"


@pytest.fixture
def far() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.fail("the networking tests need root (network namespaces)")
    name = f"nbu{secrets.token_hex(3)}"
    netns.create(name)  # brings its loopback up
    try:
        yield name
    finally:
        netns.remove(name)


def _http_server_in(ns: str, stop: threading.Event) -> int:
    """A one-answer-per-connection HTTP server on 127.0.0.1 of ``ns``; its port, which is free
    in this process's namespace too (so a connection made from here finds nothing)."""

    def make() -> socket.socket:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        return sock

    while True:
        listener = netns.call_in(ns, make)
        port = int(listener.getsockname()[1])
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                break
        listener.close()
    listener.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = listener.accept()
                with conn:
                    conn.recv(4096)
                    conn.sendall(ANSWER)
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return port


async def _get(url: str, connect_s: float = 5.0) -> httpx.Response:
    transport = upstream.GuestTransport(httpx.Limits(max_connections=4))
    async with httpx.AsyncClient(
        transport=transport, timeout=httpx.Timeout(10, connect=connect_s), trust_env=False
    ) as client:
        return await client.get(url)


def test_guests_are_reached_from_the_host_link_namespace(far: str, settings: Any) -> None:
    stop = threading.Event()
    port = _http_server_in(far, stop)
    try:
        settings.SANDBOX_NET_HOST_NS = far
        response = asyncio.run(_get(f"http://127.0.0.1:{port}/"))
        assert (response.status_code, response.content) == (200, b"there")

        async def peer() -> tuple[str, int]:
            sock = await upstream.connect("127.0.0.1", port, 5.0)
            with sock:
                return sock.getpeername()  # type: ignore[no-any-return]

        assert asyncio.run(peer()) == ("127.0.0.1", port)

        # From this process's own namespace the same address has nothing listening.
        settings.SANDBOX_NET_HOST_NS = ""
        with pytest.raises(httpx.ConnectError):
            asyncio.run(_get(f"http://127.0.0.1:{port}/"))
    finally:
        stop.set()


def test_a_guest_that_does_not_answer_is_a_connect_timeout(far: str, settings: Any) -> None:
    # The namespace drops what is sent to one port: a SYN there is never answered.
    rules = "table inet t {\n chain o {\n  type filter hook output priority 0;\n  tcp dport 9 drop\n }\n}\n"
    netns.run(far, ["/usr/sbin/nft", "-f", "-"], input=rules.encode())
    settings.SANDBOX_NET_HOST_NS = far
    with pytest.raises(httpx.ConnectTimeout):
        asyncio.run(_get("http://127.0.0.1:9/", connect_s=0.5))
    settings.SANDBOX_NET_HOST_NS = f"nbu{secrets.token_hex(3)}"  # gone: an error, not a hang
    with pytest.raises(httpx.ConnectError):
        asyncio.run(_get("http://127.0.0.1:9/", connect_s=0.5))
