"""Connections from the web process to guests (the preview proxy's upstream side).

A guest's address is routed from the namespace the host side of the host link lives in
(docs/networking.md): the host's own in production, where this process runs, so nothing
changes there; under the tests a namespace of the test's own stands in for the host
(``SANDBOX_NET_HOST_NS``), and a socket opened in the web process's own namespace would find no
route. So every socket toward a guest is opened in that namespace (as the port forwarder's
are), on a thread that lives there (``vms.network.netns.submit``), then connected from the
event loop; the connection itself belongs to the namespace it was made in, whatever thread
uses it later.

- ``connect``: a connected socket (the websocket relay hands it to ``websockets``);
- ``GuestTransport``: an httpx transport over an httpcore connection pool whose network backend
  opens its connections with ``connect`` (httpx takes a network backend only through a
  transport of one's own).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import ssl
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent.futures import BrokenExecutor
from typing import Any

import httpcore
import httpx
from django.conf import settings

from vms.network import netns
from vms.network.names import NetworkError

__all__ = ["GuestTransport", "connect", "host_link_ns"]


def host_link_ns() -> str | None:
    """The namespace guests are reached from: None is this process's own."""
    return settings.SANDBOX_NET_HOST_NS or None


async def connect(
    host: str,
    port: int,
    timeout: float | None,
    socket_options: Iterable[httpcore.SOCKET_OPTION] = (),
) -> socket.socket:
    """A non-blocking TCP socket connected to ``host:port`` from the host link's namespace.
    Raises TimeoutError when it is not connected within ``timeout`` seconds, OSError when the
    connection is refused or the address unreachable."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def make() -> socket.socket:
        return socket.socket(family, socket.SOCK_STREAM)

    ns = host_link_ns()
    if ns is None:
        sock = make()
    else:
        try:
            sock = await asyncio.wrap_future(netns.submit(ns, make))
        except (NetworkError, BrokenExecutor) as exc:
            raise OSError(f"no socket in namespace {ns}: {exc}") from exc
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for option in socket_options:
            sock.setsockopt(*option)
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class _SocketStream(httpcore.AsyncNetworkStream):
    """A connected socket, read and written from the event loop."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.get_running_loop().sock_recv(self._sock, max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_sendall(self._sock, buffer)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        self._sock.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.UnsupportedProtocol("guests are reached over plain HTTP")

    def get_extra_info(self, info: str) -> Any:
        if info == "socket":
            return self._sock
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "is_readable":
            # Asked of an idle kept-alive connection: readable means the guest closed it (or
            # sent what nobody asked for), so it is not used again.
            if self._sock.fileno() < 0:
                return True
            poll = select.poll()
            poll.register(self._sock, select.POLLIN)
            return bool(poll.poll(0))
        return None


class _Backend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if local_address is not None:
            raise httpcore.ConnectError("a local address is not supported")
        try:
            sock = await connect(host, port, timeout, socket_options or ())
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"{host}:{port}: no connection in {timeout} s") from exc
        except OSError as exc:
            raise httpcore.ConnectError(f"{host}:{port}: {exc}") from exc
        return _SocketStream(sock)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("guests are not reached over unix sockets")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


# httpcore's errors as httpx's, the specific before the general (what httpx's own transport does).
_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
)


@contextlib.contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for core, ours in _ERRORS:
            if isinstance(exc, core):
                raise ours(str(exc)) from exc
        raise


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        if hasattr(self._stream, "aclose"):
            await self._stream.aclose()


class GuestTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to guests over connections opened by ``connect``, pooled within ``limits``."""

    def __init__(self, limits: httpx.Limits) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_Backend(),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)  # noqa: S101 - httpx's contract
        outgoing = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _as_httpx_errors():
            response = await self._pool.handle_async_request(outgoing)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()
