"""Host ports for the VMs' port forwards: a small userspace TCP/UDP forwarder (asyncio).

A forward's rule (``vms.network.ruleset``) is a DNAT on the namespace side of the host link:
``<link namespace address>:<host port>`` reaches the guest. To offer it on the host's own
addresses without any rule in the host namespace, this forwarder listens on
``SANDBOX_FORWARD_BIND`` (127.0.0.1 by default) at each forward's host port and relays each TCP
connection (each UDP client's datagrams) to the same port at the link's namespace side. Its
outgoing sockets are opened in the namespace the host side of the link lives in (the host's own,
or the one a test stands in with), so the traffic enters the product namespace through the link,
where the forward's rule takes it.

The set of listeners follows the forwards of plugged VMs (``wanted``, polled): a removed forward's
listener is closed with the connections it relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vms.network import netns

log = logging.getLogger("sandbox.vms.forwarder")

__all__ = ["Forwarder", "run_thread"]

Key = tuple[str, int]  # (protocol, host port)
UDP_IDLE_S = 60.0
CONNECT_TIMEOUT_S = 10.0
CHUNK = 64 * 1024


def _socket_in(ns: str | None, kind: int) -> socket.socket:
    """A new non-blocking IPv4 socket in namespace ``ns`` (None: this process's own)."""

    def make() -> socket.socket:
        return socket.socket(socket.AF_INET, kind)

    sock = make() if ns is None else netns.call_in(ns, make)
    sock.setblocking(False)
    return sock


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


@dataclass
class _Listener:
    server: asyncio.base_events.Server | None = None
    transport: asyncio.DatagramTransport | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.transport is not None:
            self.transport.close()
        for task in list(self.tasks):
            task.cancel()
        for closer in self.closers:
            with contextlib.suppress(Exception):
                closer()


class _UdpRelay(asyncio.DatagramProtocol):
    """One listening UDP port: a connected socket toward the target per client address."""

    def __init__(self, forwarder: Forwarder, port: int, listener: _Listener) -> None:
        self.forwarder, self.port, self.listener = forwarder, port, listener
        self.transport: asyncio.DatagramTransport | None = None
        self.clients: dict[tuple[str, int], asyncio.DatagramTransport] = {}
        self.last_seen: dict[tuple[str, int], float] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        self.last_seen[addr] = loop.time()
        upstream = self.clients.get(addr)
        if upstream is not None:
            upstream.sendto(data)
            return
        task = loop.create_task(self._open(addr, data))
        self.listener.tasks.add(task)
        task.add_done_callback(self.listener.tasks.discard)

    async def _open(self, addr: tuple[str, int], first: bytes) -> None:
        loop = asyncio.get_running_loop()
        sock = _socket_in(self.forwarder.out_ns, socket.SOCK_DGRAM)
        sock.connect((str(self.forwarder.target), self.port))
        relay = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, _addr: tuple[str, int]) -> None:
                relay.last_seen[addr] = loop.time()
                if relay.transport is not None:
                    relay.transport.sendto(data, addr)

        transport, _ = await loop.create_datagram_endpoint(Back, sock=sock)
        self.clients[addr] = transport
        self.listener.closers.append(transport.close)
        transport.sendto(first)
        while not transport.is_closing():
            await asyncio.sleep(UDP_IDLE_S / 4)
            if loop.time() - self.last_seen.get(addr, 0) > UDP_IDLE_S:
                break
        transport.close()
        self.clients.pop(addr, None)


class Forwarder:
    """Listeners on ``bind`` for each wanted (protocol, host port), relaying to ``target`` (the
    namespace side of the host link) from sockets opened in ``out_ns``."""

    def __init__(self, bind: str, target: ipaddress.IPv4Address, out_ns: str | None) -> None:
        self.bind, self.target, self.out_ns = bind, target, out_ns
        self.listeners: dict[Key, _Listener] = {}

    @property
    def ports(self) -> set[Key]:
        return set(self.listeners)

    async def sync(self, wanted: Iterable[Key]) -> None:
        """Open the listeners that are wanted and not open, close the others."""
        want = set(wanted)
        for key in sorted(set(self.listeners) - want):
            self.listeners.pop(key).close()
            log.info("forward %s/%s closed", *key)
        for key in sorted(want - set(self.listeners)):
            try:
                self.listeners[key] = await self._open(*key)
                log.info("forward %s/%s open on %s", key[0], key[1], self.bind)
            except OSError as exc:  # taken by another program: tried again at the next sync
                log.warning("cannot listen on %s %s/%s: %s", self.bind, key[0], key[1], exc)

    async def _open(self, proto: str, port: int) -> _Listener:
        listener = _Listener()
        loop = asyncio.get_running_loop()
        if proto == "tcp":

            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                task = asyncio.current_task()
                if task is not None:
                    listener.tasks.add(task)
                try:
                    await self._relay_tcp(port, reader, writer)
                finally:
                    if task is not None:
                        listener.tasks.discard(task)

            listener.server = await asyncio.start_server(
                handle, self.bind, port, reuse_address=True
            )
        else:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpRelay(self, port, listener), local_addr=(self.bind, port)
            )
            listener.transport = transport
        return listener

    async def _relay_tcp(
        self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        sock = _socket_in(self.out_ns, socket.SOCK_STREAM)
        try:
            await asyncio.wait_for(
                loop.sock_connect(sock, (str(self.target), port)), CONNECT_TIMEOUT_S
            )
            up_reader, up_writer = await asyncio.open_connection(sock=sock)
        except (OSError, TimeoutError):
            sock.close()
            writer.close()
            return
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()

    async def close(self) -> None:
        await self.sync(())


def run_thread(
    forwarder: Forwarder,
    wanted: Callable[[], set[Key]],
    stop: threading.Event,
    poll_s: float = 1.0,
) -> threading.Thread:
    """Run ``forwarder`` on a thread of its own (its own event loop), syncing its listeners to
    ``wanted()`` (called on a worker thread: it may query the database) every ``poll_s``
    until ``stop`` is set."""

    async def main() -> None:
        try:
            while not stop.is_set():
                try:
                    await forwarder.sync(await asyncio.to_thread(wanted))
                except Exception:  # the next round tries again
                    log.exception("syncing the port forwards failed")
                await asyncio.sleep(poll_s)
        finally:
            await forwarder.close()

    thread = threading.Thread(target=lambda: asyncio.run(main()), name="forwarder", daemon=True)
    thread.start()
    return thread
