"""A small, synchronous QMP (QEMU Machine Protocol) client.

QMP is newline-delimited JSON over a unix socket: a greeting, ``qmp_capabilities``, then commands
answered by ``{"return": ...}`` or ``{"error": ...}``, with asynchronous ``{"event": ...}``
messages interleaved at any point. Every command carries an ``id`` so that a reply is matched to
its request even when events arrive first; events are kept in ``events`` for callers that care
(e.g. ``SHUTDOWN``). Every read has a deadline: a wedged VMM gives ``QMPTimeout``, never a hang.

A QEMU ``-qmp`` unix socket serves one client at a time, so the driver opens a client per
operation and closes it straight away (about a millisecond).
"""

from __future__ import annotations

import array
import itertools
import json
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from .base import HypervisorError
from .process import check_peer

__all__ = ["QMPClient", "QMPConnectionLost", "QMPError", "QMPTimeout"]


class QMPError(HypervisorError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, klass: str, desc: str) -> None:
        super().__init__(f"QMP {command} failed: {klass}: {desc}")
        self.command = command
        self.klass = klass
        self.desc = desc


class QMPTimeout(HypervisorError):
    """No answer from QMP before the deadline."""


class QMPConnectionLost(HypervisorError):
    """QEMU closed or reset the QMP connection (usually: the QEMU process died).

    A VMM that exits while a command of ours is still unread in its socket makes the kernel
    reset the connection (``ECONNRESET``); one that exits after reading it gives end-of-file;
    a write after it exited gives ``EPIPE``. All three are this error, never a bare ``OSError``.
    """


class QMPClient:
    """One QMP session. Use as a context manager, or call ``close()``."""

    def __init__(self, path: Path, timeout: float = 5.0, peer_pid: int | None = None) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.peer_pid = peer_pid
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._buf = b""
        self._ids = itertools.count(1)

    # -- connection -------------------------------------------------------------------------
    @classmethod
    def connect(
        cls, path: Path, timeout: float = 5.0, retry_for: float = 0.0, peer_pid: int | None = None
    ) -> QMPClient:
        """Connect and negotiate capabilities; retry for ``retry_for`` s while the socket is
        missing or refusing (a VMM that is still starting). ``peer_pid``: refuse the socket,
        before a byte is exchanged, unless that process serves it (``process.check_peer``)."""
        client = cls(path, timeout, peer_pid)
        deadline = time.monotonic() + retry_for
        while True:
            try:
                client._open()
                return client
            except (FileNotFoundError, ConnectionRefusedError, QMPTimeout) as exc:
                client.close()
                if time.monotonic() >= deadline:
                    raise HypervisorError(f"QMP socket {path} not answering: {exc}") from exc
                time.sleep(0.01)

    def _open(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
            if self.peer_pid is not None:
                check_peer(sock, self.peer_pid, f"QMP socket {self.path}")
        except (OSError, HypervisorError):
            sock.close()
            raise
        self._sock = sock
        self._buf = b""
        deadline = time.monotonic() + self.timeout
        greeting = self._read_message(deadline)
        if "QMP" not in greeting:
            raise HypervisorError(f"unexpected QMP greeting: {greeting!r}")
        self.greeting = greeting
        self.execute("qmp_capabilities")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- wire -------------------------------------------------------------------------------
    def _read_message(self, deadline: float) -> dict[str, Any]:
        assert self._sock is not None, "QMP client is closed"
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QMPTimeout(f"QMP on {self.path}: no answer in time")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as exc:
                raise QMPTimeout(f"QMP on {self.path}: no answer in time") from exc
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise QMPConnectionLost(f"QMP on {self.path}: connection reset by QEMU") from exc
            if not chunk:
                raise QMPConnectionLost(f"QMP on {self.path}: connection closed by QEMU")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise HypervisorError(f"QMP sent a non-object: {msg!r}")
        return msg

    def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        fds: tuple[int, ...] = (),
    ) -> Any:
        """Run one command and return its ``return`` value; raise ``QMPError`` on an error.

        ``fds`` are passed with SCM_RIGHTS alongside the command (for ``getfd``).
        """
        assert self._sock is not None, "QMP client is closed"
        msg_id = f"c{next(self._ids)}"
        req: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            req["arguments"] = arguments
        data = json.dumps(req).encode() + b"\n"
        self._sock.settimeout(timeout or self.timeout)
        try:
            if fds:
                self._sock.sendmsg(
                    [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                )
            else:
                self._sock.sendall(data)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise QMPConnectionLost(f"QMP on {self.path}: connection lost: {exc}") from exc
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            msg = self._read_message(deadline)
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") != msg_id:
                continue  # a late answer to a command that timed out earlier
            if "error" in msg:
                err = msg["error"]
                raise QMPError(command, err.get("class", "?"), err.get("desc", ""))
            return msg.get("return")

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        """Wait for an asynchronous event (already received ones count)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("event") == name:
                    return self.events.pop(i)
            msg = self._read_message(deadline)
            if "event" in msg:
                self.events.append(msg)
