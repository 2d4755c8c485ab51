"""The simulator's guest-facing devices: the serial socket, hybrid vsock and the guest's agent.

- ``SerialPort``: CH's ``serial: {mode: Socket}``. Listens on the socket from ``vm.create``; one
  client at a time (a new one disconnects the old); two-way; output written before a client
  attaches is kept in a 1 MiB ring and replayed (v53). The simulated guest echoes what is typed.
- ``VsockMuxer``: Firecracker-style hybrid vsock on ``vsock.socket``. A host client writes
  ``CONNECT <port>\\n`` (case-insensitive, at most 32 bytes, 2 s to send it); if a guest listener
  accepts, the muxer answers ``OK <n>\\n`` with n a host-side port in [2^30, 2^31-1] and the
  stream is raw from then on; with no listener the connection is closed.
- ``GuestService``: what listens on guest port 1024: the real guest agent run on the host
  (``$CHSIM_GUEST_AGENT``, a JSON argv with ``{listen}`` for its unix socket), else an echo
  service. It starts some time after boot, like a real guest's agent.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

RING_BYTES = 1 << 20
HANDSHAKE_TIMEOUT = 2.0
_CONNECT = re.compile(rb"connect ([0-9]+)\n", re.IGNORECASE)


def _bind_unix(path: str) -> socket.socket:
    """Bind and listen like CH: a leftover file makes the bind fail (EADDRINUSE)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    return sock


def _close(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class Gate:
    """Open while the guest runs, shut while it is paused: device threads wait at it."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()

    def freeze(self) -> None:
        self._open.clear()

    def thaw(self) -> None:
        self._open.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._open.wait(timeout)


class SerialPort:
    def __init__(self, path: str, gate: Gate) -> None:
        self.path = path
        self.gate = gate
        self.ring = bytearray()
        self.lock = threading.Lock()
        self.client: socket.socket | None = None
        self.listener = _bind_unix(path)
        self.closed = False
        threading.Thread(target=self._accept, name="serial-accept", daemon=True).start()

    def write(self, data: bytes) -> None:
        """Guest output: kept in the ring and sent to the attached client, if any."""
        with self.lock:
            self.ring += data
            del self.ring[:-RING_BYTES]
            client = self.client
        if client is not None:
            with contextlib.suppress(OSError):
                client.sendall(data)

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                old, self.client = self.client, conn
                replay = bytes(self.ring)
            _close(old)  # one client at a time: the newcomer wins
            with contextlib.suppress(OSError):
                conn.sendall(replay)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        while True:
            try:
                data = conn.recv(4096)
            except OSError:
                return
            if not data:
                return
            self.gate.wait()
            # The simulated guest's tty echoes input, turning CR into CRLF.
            self.write(data.replace(b"\r", b"\r\n"))

    def close(self) -> None:
        self.closed = True
        _close(self.listener)
        with self.lock:
            client, self.client = self.client, None
        _close(client)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class GuestService:
    """The guest's agent on one vsock port, reachable by the muxer at a host unix path."""

    def __init__(self, listen: str, command: list[str] | None) -> None:
        self.listen = listen
        self.command = command
        self.proc: subprocess.Popen[bytes] | None = None
        self.listener: socket.socket | None = None
        self.conns: set[socket.socket] = set()
        self.timer: threading.Timer | None = None
        self.lock = threading.Lock()
        self.gate = Gate()

    def start(self, delay: float) -> None:
        self.stop()
        self.gate.thaw()
        self.timer = threading.Timer(delay, self._start_now)
        self.timer.daemon = True
        self.timer.start()

    def _start_now(self) -> None:
        with self.lock:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen)
            if self.command:
                argv = [part.replace("{listen}", self.listen) for part in self.command]
                # Same process group as the VMM: killing the VMM's group kills the guest too.
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
            else:
                self.listener = _bind_unix(self.listen)
                threading.Thread(
                    target=self._echo_accept, args=(self.listener,), daemon=True
                ).start()

    def _echo_accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self.lock:
                self.conns.add(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                self.gate.wait()
                conn.sendall(data)
        _close(conn)

    def freeze(self) -> None:
        self.gate.freeze()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.gate.thaw()

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        with self.lock:
            proc, self.proc = self.proc, None
            listener, self.listener = self.listener, None
            conns, self.conns = self.conns, set()
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3)
        _close(listener)
        for conn in conns:
            _close(conn)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.listen)
        self.gate.thaw()


class VsockMuxer:
    """Host side of hybrid vsock: the ``CONNECT`` handshake, then a relay to the guest port."""

    def __init__(self, path: str, gate: Gate, guest_port: Callable[[int], str | None]) -> None:
        self.path = path
        self.gate = gate
        self.guest_port = guest_port
        self.listener = _bind_unix(path)
        self.conns: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.ports = itertools.count(1 << 30)
        self.closed = False
        threading.Thread(target=self._accept, name="vsock-accept", daemon=True).start()

    def _track(self, sock: socket.socket) -> None:
        with self.lock:
            self.conns.add(sock)

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._track(conn)
            threading.Thread(target=self._handshake, args=(conn,), daemon=True).start()

    def _handshake(self, conn: socket.socket) -> None:
        conn.settimeout(HANDSHAKE_TIMEOUT)
        line = b""
        try:
            while not line.endswith(b"\n") and len(line) < 32:
                chunk = conn.recv(1)
                if not chunk:
                    break
                line += chunk
        except OSError:
            _close(conn)
            return
        match = _CONNECT.fullmatch(line)
        # A paused guest answers nothing; CH drops the request after its 2 s timeout.
        if match is None or not self.gate.wait(HANDSHAKE_TIMEOUT):
            _close(conn)
            return
        target = self.guest_port(int(match.group(1)))
        guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if target is None:
                raise ConnectionRefusedError("no guest listener")
            guest.connect(target)
        except OSError:
            _close(guest)
            _close(conn)  # no listener in the guest: CH closes without an answer
            return
        self._track(guest)
        host_port = next(self.ports)
        try:
            conn.sendall(f"OK {host_port}\n".encode())
        except OSError:
            _close(guest)
            _close(conn)
            return
        conn.settimeout(None)
        threading.Thread(target=self._pump, args=(conn, guest), daemon=True).start()
        threading.Thread(target=self._pump, args=(guest, conn), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.gate.wait()
                dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        except OSError:
            _close(src)
            _close(dst)

    def reset_connections(self) -> None:
        """A guest reboot or shutdown ends every stream (the guest's end is gone)."""
        with self.lock:
            conns, self.conns = self.conns, set()
        for conn in conns:
            _close(conn)

    def close(self) -> None:
        """Clean device shutdown: stop listening and remove the socket file."""
        self.closed = True
        _close(self.listener)
        self.reset_connections()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def log(message: str) -> None:
    """One line to the VMM's stdout, i.e. the driver's vmm.log."""
    sys.stdout.write(f"chsim {time.strftime('%H:%M:%S')} {message}\n")
    sys.stdout.flush()


def guest_listen_path(vsock_socket: str, port: int) -> str:
    return str(Path(f"{vsock_socket}.guest{port}"))
