"""Host side of the guest agent protocol v2 (see docs/agent-protocol.md). No Django imports.

``AgentClient`` wraps one byte stream to one agent (a unix socket QEMU exposes for the
virtio-serial port, a hybrid-vsock socket after ``CONNECT``, or a test agent's socket). Calls from
any number of threads are multiplexed over it: each request has an id, one reader thread routes
every reply frame to the queue of the call that waits for it, and each caller consumes its own
queue (so streaming callbacks run on the caller's thread, never on the reader's). A call's queue
holds at most ``CALL_QUEUE_FRAMES`` frames: when its caller is slower than the guest (a slow
websocket), the reader waits, the stream backs up into the guest and the process there blocks on
its pipe, so the host's memory per call stays bounded. Frames of a call that has ended are
dropped.

Every request carries the VM's agent credential (``credential``; the agent refuses any other
request but ``enroll``). The credential is never logged, and never part of an error's message.
Callers in the product get their client from ``vms.agent.credentials.client_for_vm``, which
knows where each VM's credential is kept.

Every wait has a timeout. Failures are ``AgentError`` (the agent said no, with its error code),
``AgentTimeout`` (no answer in time), ``AgentProtocolError`` (the agent said something that makes
no sense) or ``AgentDisconnected`` (the stream ended).
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import hashlib
import itertools
import json
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

__all__ = [
    "PROTOCOL_VERSION",
    "AgentClient",
    "AgentDisconnected",
    "AgentError",
    "AgentProtocolError",
    "AgentTimeout",
    "DirEntry",
    "ExecResult",
    "FileStat",
    "Hello",
    "Transfer",
    "decode_frames",
    "encode_frame",
]

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2
MAGIC = b"\x7fSBA"
PREFIX_LEN = 12
MAX_FRAME = 1 << 20
DEFAULT_CHUNK = 256 * 1024
# Grace on top of an exec's own timeout: the agent kills at the deadline and then still has to
# drain pipes and report; under TCG with many VMs that takes a while.
EXEC_GRACE_S = 15.0
CALL_QUEUE_FRAMES = 64  # frames waiting for one call's caller (exec output: 64 KiB each)

Frame = tuple[dict[str, Any], bytes]


class AgentError(Exception):
    """The agent answered a request with an error frame (``code`` is machine-readable)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AgentTimeout(AgentError):
    def __init__(self, message: str) -> None:
        super().__init__("timeout", message)


class AgentProtocolError(AgentError):
    def __init__(self, message: str) -> None:
        super().__init__("protocol_error", message)


class AgentDisconnected(AgentError):
    def __init__(self, message: str = "connection to the agent closed") -> None:
        super().__init__("disconnected", message)


@dataclass(frozen=True)
class Hello:
    protocol: int
    agent_version: str
    capabilities: tuple[str, ...]
    max_frame: int
    chunk_size: int
    boot_id: str | None
    raw: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class ExecResult:
    exit_code: int | None  # None when killed by a signal
    stdout: bytes
    stderr: bytes
    timed_out: bool
    duration_s: float  # how long the process ran, measured in the guest
    signal: int | None = None
    # Bytes the process wrote to each stream; more than ``stdout``/``stderr`` hold when ``keep``
    # limited what was kept (-1: not counted, for results built elsewhere).
    stdout_size: int = -1
    stderr_size: int = -1

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @property
    def truncated(self) -> bool:
        return self.stdout_size > len(self.stdout) or self.stderr_size > len(self.stderr)


@dataclass(frozen=True)
class FileStat:
    path: str
    type: str  # file, dir, symlink, other
    size: int
    mode: int
    mtime: float
    uid: int
    gid: int
    target: str | None = None  # symlink target


@dataclass(frozen=True)
class DirEntry:
    name: str
    type: str
    size: int
    mode: int
    mtime: float
    uid: int
    gid: int


@dataclass(frozen=True)
class Transfer:
    path: str
    size: int
    sha256: str


# --------------------------------------------------------------------------- framing


# Host randomness a configure gives the guest to reseed its CRNG with (``configure``).
ENTROPY_BYTES = 32


def encode_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    if len(head) + len(payload) > MAX_FRAME:
        raise ValueError(f"frame of {len(head) + len(payload)} bytes exceeds {MAX_FRAME}")
    return b"".join(
        (MAGIC, len(head).to_bytes(4, "big"), len(payload).to_bytes(4, "big"), head, payload)
    )


def decode_frames(buf: bytearray) -> Iterator[Frame]:
    """Yield the complete frames at the start of ``buf``, removing them (and garbage) from it.

    Bytes before a magic are dropped: after the host reconnects to a virtio-serial port the
    agent may still be finishing a frame it started writing for the previous connection.
    """
    while True:
        if len(buf) >= 4 and buf[:4] != MAGIC:
            at = buf.find(MAGIC)
            skipped = len(buf) - 3 if at < 0 else at
            log.debug("agent stream: skipping %d bytes outside a frame", skipped)
            del buf[:skipped]
            if at < 0:
                return
        if len(buf) < PREFIX_LEN:
            return
        hlen = int.from_bytes(buf[4:8], "big")
        plen = int.from_bytes(buf[8:12], "big")
        if hlen == 0 or hlen + plen > MAX_FRAME:
            log.warning("agent stream: bad frame lengths %d/%d, resynchronising", hlen, plen)
            del buf[:1]
            continue
        end = PREFIX_LEN + hlen + plen
        if len(buf) < end:
            return
        head = bytes(buf[PREFIX_LEN : PREFIX_LEN + hlen])
        payload = bytes(buf[PREFIX_LEN + hlen : end])
        del buf[:end]
        try:
            header = json.loads(head)
        except ValueError:
            log.warning("agent stream: undecodable header dropped")
            continue
        if isinstance(header, dict):
            yield header, payload


# --------------------------------------------------------------------------- client


class _AgentConnector(Protocol):
    """What ``from_hypervisor`` needs of a driver (``vms.hypervisors.base.Hypervisor``)."""

    def agent_connect(self, runtime: Any, timeout: float) -> socket.socket: ...


class _Call:
    __slots__ = ("id", "queue")

    def __init__(self, call_id: int) -> None:
        self.id = call_id
        self.queue: queue.Queue[Frame | AgentError] = queue.Queue(CALL_QUEUE_FRAMES)


# What an upload or an exec's stdin reads from: bytes in memory, a binary stream, or an iterable
# of byte chunks. Never a str or Path: a name is not opened (a value from a request, a form
# field for instance, would otherwise read any file of the host); a file of the host is
# uploaded only through ``put_host_file``, for trusted internal callers.
Source = bytes | bytearray | memoryview | IO[bytes] | Iterable[bytes]


class AgentClient:
    """A thread-safe client for one agent.

    ``target`` is a connected stream socket, or a function returning a new one (then ``hello``
    also retries the connection itself, e.g. while the VMM has not created its socket yet).
    """

    def __init__(
        self,
        target: socket.socket | Callable[[], socket.socket],
        *,
        timeout: float = 30.0,
        name: str = "agent",
        credential: str | None = None,
    ) -> None:
        self.credential = credential
        self._connect_fn = None if isinstance(target, socket.socket) else target
        self._sock: socket.socket | None = target if isinstance(target, socket.socket) else None
        self.timeout = timeout
        self.name = name
        self.hello_info: Hello | None = None
        # Ids start at a random point: a reply still on its way to an earlier connection
        # (virtio-serial keeps one stream across host connections) never matches a call of
        # this one.
        self._ids = itertools.count(secrets.randbelow(1 << 48) + 1)
        self._calls: dict[int, _Call] = {}
        # Ids of hellos sent (a retry loop abandons its unanswered ones): their late answers,
        # errors too (a guest not enrolled yet answers each with one), are expected.
        self._hello_ids: set[int] = set()
        self._calls_lock = threading.Lock()
        self._wlock = threading.Lock()
        self._conn_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._closed = False
        self._dead: AgentError | None = None
        if self._sock is not None:
            self._start_reader(self._sock)

    @classmethod
    def from_hypervisor(
        cls,
        hypervisor: _AgentConnector,
        runtime: Any,
        *,
        connect_timeout: float = 5.0,
        timeout: float = 30.0,
        credential: str | None = None,
    ) -> AgentClient:
        """A client that (re)connects through ``hypervisor.agent_connect(runtime, ...)``,
        presenting ``credential`` (None: only ``enroll`` will be accepted).

        Call ``hello(timeout)`` next: it retries until the guest's agent answers.
        """
        name = f"agent:{getattr(getattr(runtime, 'root', None), 'name', runtime)}"
        return cls(
            lambda: hypervisor.agent_connect(runtime, connect_timeout),
            timeout=timeout,
            name=name,
            credential=credential,
        )

    # ---- connection management

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=5)

    def _start_reader(self, sock: socket.socket) -> None:
        self._dead = None
        self._reader = threading.Thread(
            target=self._read_loop, args=(sock,), name=f"{self.name}-reader", daemon=True
        )
        self._reader.start()

    @property
    def greeted(self) -> bool:
        """Connected, its hello answered on this connection, and the connection not lost since:
        a request sent now reaches the agent that answered."""
        return (
            not self._closed
            and self._sock is not None
            and self._dead is None
            and self.hello_info is not None
        )

    def connect(self, timeout: float) -> None:
        """Connect now (``hello`` does when needed): to be connected before the guest runs."""
        self._connect(time.monotonic() + timeout)

    def _connect(self, deadline: float) -> None:
        """(Re)connect through the connect function, retrying until ``deadline``."""
        with self._conn_lock:
            if self._sock is not None and self._dead is None:
                return
            if self._connect_fn is None:
                raise self._dead or AgentDisconnected()
            if self._sock is not None:
                self._sock.close()
                if self._reader is not None:
                    self._reader.join(timeout=5)
            last: Exception | None = None
            while time.monotonic() < deadline:
                try:
                    sock = self._connect_fn()
                except OSError as exc:
                    last = exc
                    time.sleep(0.05)
                    continue
                self._sock = sock
                self._start_reader(sock)
                return
            raise AgentTimeout(f"could not connect to {self.name}: {last}")

    def _read_loop(self, sock: socket.socket) -> None:
        buf = bytearray()
        reason: AgentError = AgentDisconnected()
        try:
            while True:
                data = sock.recv(1 << 18)
                if not data:
                    break
                buf += data
                for header, payload in decode_frames(buf):
                    self._route(header, payload)
        except OSError as exc:
            if not self._closed:
                reason = AgentDisconnected(f"connection to the agent failed: {exc}")
        self._dead = reason
        with self._calls_lock:
            calls = list(self._calls.values())
        for call in calls:
            self._deliver(call, reason)

    def _deliver(self, call: _Call, item: Frame | AgentError) -> None:
        """Queue ``item`` for ``call``, waiting while its queue is full unless the call ends."""
        while True:
            try:
                call.queue.put(item, timeout=0.25)
                return
            except queue.Full:
                if self._calls.get(call.id) is not call:
                    return  # the caller has gone: nobody will read it

    def _route(self, header: dict[str, Any], payload: bytes) -> None:
        call_id = header.get("id")
        call = self._calls.get(call_id) if isinstance(call_id, int) else None
        if call is not None:
            self._deliver(call, (header, payload))
        elif header.get("kind") == "error" and call_id not in self._hello_ids:
            log.warning("%s: error not tied to a live request: %s", self.name, header)
        else:
            # Late answers to abandoned calls (e.g. the hellos a retry loop gave up on).
            log.debug("%s: dropping frame for unknown id %r", self.name, call_id)

    # ---- request plumbing

    def _open_call(self) -> _Call:
        call = _Call(next(self._ids))
        with self._calls_lock:
            self._calls[call.id] = call
        return call

    def _close_call(self, call: _Call) -> None:
        with self._calls_lock:
            self._calls.pop(call.id, None)

    def __repr__(self) -> str:
        return f"<AgentClient {self.name}>"  # never the credential

    def _frame(self, header: dict[str, Any], payload: bytes = b"") -> bytes:
        if self.credential is not None and header.get("op") != "enroll":
            header = {**header, "auth": self.credential}
        return encode_frame(header, payload)

    def _send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        self._write(self._frame(header, payload))

    def _write(self, data: bytes) -> None:
        sock = self._sock
        if sock is None or self._dead is not None:
            raise self._dead or AgentDisconnected("not connected")
        with self._wlock:
            try:
                sock.sendall(data)
            except OSError as exc:
                raise AgentDisconnected(f"sending to the agent failed: {exc}") from exc

    def _next(self, call: _Call, deadline: float, what: str) -> Frame:
        """The next frame for ``call``; error frames become AgentError."""
        remaining = deadline - time.monotonic()
        try:
            item = call.queue.get(timeout=max(remaining, 0.0)) if remaining > 0 else None
        except queue.Empty:
            item = None
        if item is None:
            raise AgentTimeout(f"{what}: no answer from {self.name} in time")
        if isinstance(item, AgentError):
            raise item
        header = item[0]
        if header.get("kind") == "error":
            raise AgentError(str(header.get("code", "error")), str(header.get("message", "")))
        return item

    def _request(
        self, header: dict[str, Any], payload: bytes = b"", *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Send one request and return its single reply frame's header."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        call = self._open_call()
        try:
            self._send({**header, "id": call.id}, payload)
            return self._next(call, deadline, str(header["op"]))[0]
        finally:
            self._close_call(call)

    def _require(self, op: str) -> None:
        """Refuse an op the agent did not list at hello (an older guest image), before sending:
        a clear reason instead of the agent's ``unknown_op``."""
        info = self.hello_info
        if info is not None and op not in info.capabilities:
            raise AgentError(
                "unsupported",
                f"the guest agent {info.agent_version or '(unknown version)'} has no {op!r} "
                "operation: the guest image predates it",
            )

    # ---- operations

    def hello(self, timeout: float = 60.0, *, interval: float = 0.2) -> Hello:
        """Handshake, retried until answered: a guest loses bytes sent before its agent runs."""
        deadline = time.monotonic() + timeout
        attempt = interval
        while True:
            if self._connect_fn is not None:
                self._connect(deadline)
            elif self._dead is not None:
                raise self._dead
            call = self._open_call()
            if len(self._hello_ids) < 4096:
                self._hello_ids.add(call.id)
            try:
                header = {"op": "hello", "id": call.id, "protocol": [PROTOCOL_VERSION]}
                try:
                    self._send(header)
                    wait_until = min(deadline, time.monotonic() + attempt)
                    reply = self._next(call, wait_until, "hello")[0]
                except AgentDisconnected:
                    if self._connect_fn is None or time.monotonic() >= deadline:
                        raise
                    time.sleep(0.05)
                    continue
                except AgentTimeout:
                    if time.monotonic() >= deadline:
                        raise AgentTimeout(
                            f"{self.name} did not answer hello within {timeout:.1f}s"
                        ) from None
                    # A short cap: a guest that just came up is noticed within half a second.
                    attempt = min(attempt * 1.5, 0.5)
                    continue
            finally:
                self._close_call(call)
            return self._took_hello(reply)

    def _took_hello(self, reply: dict[str, Any]) -> Hello:
        if reply.get("kind") != "hello" or reply.get("protocol") != PROTOCOL_VERSION:
            raise AgentProtocolError(f"unexpected hello reply: {reply}")
        self.hello_info = Hello(
            protocol=int(reply["protocol"]),
            agent_version=str(reply.get("agent_version", "")),
            capabilities=tuple(reply.get("capabilities", ())),
            max_frame=int(reply.get("max_frame", MAX_FRAME)),
            chunk_size=int(reply.get("chunk_size", DEFAULT_CHUNK)),
            boot_id=reply.get("boot_id"),
            raw=reply,
        )
        return self.hello_info

    def pipeline(
        self, ops: builtins.list[dict[str, Any]], *, timeout: float | None = None
    ) -> builtins.list[dict[str, Any]]:
        """Send the requests ``ops`` (headers without ``id``: ``hello_request``,
        ``configure_request``, ``rotate_request``) in one write, then wait for each one's reply:
        one round trip for all of them. The agent checks each request's credential and starts
        it in the order sent, so every one of them carries the credential of now, and a
        ``rotate`` among them holds for what is sent after this call. A ``hello``'s reply is
        kept as ``hello_info``. Replies in the order of ``ops``; the first request that failed
        raises its error (after every reply came or the deadline passed)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        if self._connect_fn is not None:
            self._connect(deadline)
        calls = [self._open_call() for _ in ops]
        try:
            self._write(
                b"".join(
                    self._frame({**op, "id": call.id}) for op, call in zip(ops, calls, strict=True)
                )
            )
            replies: builtins.list[dict[str, Any]] = []
            failed: AgentError | None = None
            for op, call in zip(ops, calls, strict=True):
                try:
                    head = self._next(call, deadline, str(op["op"]))[0]
                    if op["op"] == "hello":
                        self._took_hello(head)
                    elif op["op"] == "rotate":
                        self.credential = str(op["credential"])
                except AgentError as exc:
                    failed = failed or exc
                    head = {}
                replies.append(head)
        finally:
            for call in calls:
                self._close_call(call)
        if failed is not None:
            raise failed
        return replies

    @staticmethod
    def hello_request() -> dict[str, Any]:
        """A ``hello`` for ``pipeline``."""
        return {"op": "hello", "protocol": [PROTOCOL_VERSION]}

    def rotate_request(self, credential: str) -> dict[str, Any]:
        """A ``rotate`` to ``credential`` for ``pipeline``."""
        self._require("rotate")
        return {"op": "rotate", "credential": credential}

    def hello_enrolling(
        self, credential: str, timeout: float = 60.0, *, interval: float = 0.2
    ) -> Hello:
        """``hello`` presenting ``credential``; a guest that has none yet (a fresh boot) is
        enrolled with it first. For benches and tests that boot guests of their own: the product
        enrolls only through ``vms.agent.credentials``, which keeps each VM's credential."""
        self.credential = credential
        try:
            return self.hello(timeout, interval=interval)
        except AgentError as exc:
            if exc.code != "not_enrolled":
                raise
        self.credential = None
        self.enroll(credential)
        return self.hello(timeout, interval=interval)

    def enroll(self, credential: str, *, timeout: float = 10.0) -> None:
        """Give a guest whose agent has no credential yet (a fresh boot) its first one; from
        then on this client presents it. AgentError("already_enrolled") if it has one."""
        if self._connect_fn is not None:
            self._connect(time.monotonic() + timeout)
        self._request({"op": "enroll", "credential": credential}, timeout=timeout)
        self.credential = credential

    def rotate(self, credential: str, *, timeout: float = 10.0) -> None:
        """Replace the guest's credential (this client presents the current one) with
        ``credential``; from then on the old one is refused and this client presents the new."""
        self._require("rotate")
        self._request({"op": "rotate", "credential": credential}, timeout=timeout)
        self.credential = credential

    def ping(self, timeout: float = 5.0) -> float:
        """One round trip; returns its duration in seconds."""
        started = time.perf_counter()
        reply = self._request({"op": "ping"}, timeout=timeout)
        if reply.get("kind") != "pong":
            raise AgentProtocolError(f"unexpected ping reply: {reply}")
        return time.perf_counter() - started

    def exec(
        self,
        argv: list[str] | tuple[str, ...],
        *,
        env: dict[str, str] | None = None,
        clear_env: bool = False,
        cwd: str | None = None,
        stdin: bytes | str | IO[bytes] | Iterable[bytes] | None = None,
        timeout: float | None = 60.0,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
        wait_timeout: float | None = None,
        keep: int | None = None,
    ) -> ExecResult:
        """Run ``argv`` in the guest and wait for it.

        ``timeout`` is enforced by the agent, which kills the whole process group at the
        deadline (``timed_out=True`` in the result). ``wait_timeout`` bounds the wait here
        (default: ``timeout`` plus a grace, or the client timeout when ``timeout`` is None).
        stdout and stderr are streamed to the callbacks as they arrive, on this thread, and
        collected in the result as well: all of it, or the first ``keep`` bytes of each stream
        (the rest is counted in ``stdout_size``/``stderr_size`` and discarded, so memory stays
        bounded however much the process writes).
        """
        header: dict[str, Any] = {"op": "exec", "argv": list(argv)}
        if env:
            header["env"] = env
        if clear_env:
            header["clear_env"] = True
        if cwd is not None:
            header["cwd"] = cwd
        if timeout is not None:
            header["timeout"] = timeout
        payload = b""
        chunks: Iterable[bytes] | None = None
        if isinstance(stdin, str):
            stdin = stdin.encode()
        if isinstance(stdin, bytes | bytearray):
            if len(stdin) <= DEFAULT_CHUNK:
                header["stdin"], payload = "data", bytes(stdin)
            else:
                header["stdin"] = "stream"
                data = bytes(stdin)
                chunks = (data[i : i + DEFAULT_CHUNK] for i in range(0, len(data), DEFAULT_CHUNK))
        elif stdin is not None:
            _check_source(stdin)  # before the command starts, not when its stdin is read
            header["stdin"] = "stream"
            chunks = _iter_source(stdin)
        if wait_timeout is None:
            wait_timeout = timeout + EXEC_GRACE_S if timeout is not None else self.timeout
        deadline = time.monotonic() + wait_timeout
        out, err = bytearray(), bytearray()
        out_size = err_size = 0
        call = self._open_call()
        try:
            self._send({**header, "id": call.id}, payload)
            if chunks is not None:
                for chunk in chunks:
                    if chunk:
                        self._send({"op": "stdin", "id": call.id}, bytes(chunk))
                self._send({"op": "stdin", "id": call.id, "eof": True})
            while True:
                try:
                    head, data = self._next(call, deadline, f"exec {argv[0]}")
                except AgentTimeout:
                    self._kill_quietly(call.id)
                    raise
                kind = head.get("kind")
                if kind == "stdout":
                    out_size += len(data)
                    _keep(out, data, keep)
                    if on_stdout is not None:
                        on_stdout(data)
                elif kind == "stderr":
                    err_size += len(data)
                    _keep(err, data, keep)
                    if on_stderr is not None:
                        on_stderr(data)
                elif kind == "exit":
                    return ExecResult(
                        exit_code=head.get("exit_code"),
                        stdout=bytes(out),
                        stderr=bytes(err),
                        timed_out=bool(head.get("timed_out")),
                        duration_s=float(head.get("duration_s", 0.0)),
                        signal=head.get("signal"),
                        stdout_size=out_size,
                        stderr_size=err_size,
                    )
                else:
                    raise AgentProtocolError(f"unexpected exec frame: {head}")
        finally:
            self._close_call(call)

    def _kill_quietly(self, target: int) -> None:
        try:
            self._send({"op": "signal", "id": next(self._ids), "target": target, "signal": 9})
        except AgentError:
            pass

    def put_file(
        self,
        source: Source,
        remote_path: str,
        *,
        mode: int = 0o644,
        mkdirs: bool = False,
        expected_sha256: str | None = None,
        timeout: float = 300.0,
    ) -> Transfer:
        """Upload bytes, a binary stream or an iterable of byte chunks to ``remote_path``.

        A str or Path is refused (TypeError) before anything is sent: names of files on the host
        go through ``put_host_file``. A stream that fails while it is read (a client that went
        away mid-upload) aborts the upload: the agent deletes what it received.

        The agent hashes what it receives and renames the file into place only if the SHA-256
        matches ours (or ``expected_sha256``, when the caller knows what the content should be);
        otherwise it deletes the partial file and this raises AgentError("checksum_mismatch").
        """
        _check_source(source)
        deadline = time.monotonic() + timeout
        call = self._open_call()
        try:
            self._send(
                {"op": "put", "id": call.id, "path": remote_path, "mode": mode, "mkdirs": mkdirs}
            )
            ready = self._next(call, deadline, "put")[0]
            if ready.get("kind") != "ready":
                raise AgentProtocolError(f"unexpected put reply: {ready}")
            chunk_size = min(int(ready.get("chunk_size", DEFAULT_CHUNK)), DEFAULT_CHUNK)
            digest = hashlib.sha256()
            try:
                for chunk in _iter_source(source, chunk_size):
                    digest.update(chunk)
                    self._send({"op": "data", "id": call.id}, chunk)
                    self._raise_if_failed(call)
            except BaseException as exc:  # the agent gave up, or we did (the source failed)
                if not isinstance(exc, AgentDisconnected):
                    self._close_call(call)
                    if not isinstance(exc, AgentError):
                        # The agent still waits for the rest: tell it to drop what it has.
                        with contextlib.suppress(AgentError):
                            self._send({"op": "data", "id": call.id, "abort": True})
                    self._drain(deadline)
                raise
            ours = digest.hexdigest()
            claimed = expected_sha256 or ours
            self._send({"op": "data", "id": call.id, "eof": True, "sha256": claimed})
            result = self._next(call, deadline, "put")[0]
            if result.get("sha256") != ours:
                raise AgentProtocolError(f"agent stored sha256 {result.get('sha256')}, sent {ours}")
            return Transfer(remote_path, int(result["size"]), ours)
        finally:
            self._close_call(call)

    def _drain(self, deadline: float) -> None:
        """Wait until the agent has consumed what was sent before now (a ping's answer comes
        after it): chunks of an upload the agent gave up on are still on their way, and over
        virtio-serial, left in flight when the host disconnects, they stall the next session."""
        try:
            self.ping(timeout=max(5.0, min(deadline - time.monotonic(), 60.0)))
        except AgentError as exc:
            log.warning("%s: the stream did not settle after a failed upload: %s", self.name, exc)

    def _raise_if_failed(self, call: _Call) -> None:
        """Stop streaming an upload as soon as the agent has given up on it."""
        try:
            item = call.queue.get_nowait()
        except queue.Empty:
            return
        if isinstance(item, AgentError):
            raise item
        head = item[0]
        if head.get("kind") == "error":
            raise AgentError(str(head.get("code")), str(head.get("message", "")))
        raise AgentProtocolError(f"unexpected frame during upload: {head}")

    def put_host_file(
        self, local_path: Path, remote_path: str, *, within: Path, **options: Any
    ) -> Transfer:
        """Upload a file of the host, for trusted internal callers only (never with a path that
        came from a request): ``local_path`` must lie inside the directory ``within`` (symlinks
        resolved), else ValueError and nothing is opened or sent. Options as ``put_file``."""
        with open(_confined(local_path, within), "rb") as fh:
            return self.put_file(fh, remote_path, **options)

    def get_file(self, remote_path: str, dest: IO[bytes], *, timeout: float = 300.0) -> Transfer:
        """Download ``remote_path`` into a writable binary file object.

        The SHA-256 the agent computed while reading is checked against the bytes received; on a
        mismatch AgentError("checksum_mismatch") is raised (the caller discards what it got). A
        str or Path is refused (TypeError): files of the host are written only through
        ``get_host_file``.
        """
        if isinstance(dest, str | bytes | os.PathLike) or not hasattr(dest, "write"):
            raise TypeError(
                "get_file writes to a binary file object; use get_host_file for a host path"
            )
        return self._get(remote_path, dest, timeout)

    def get_host_file(
        self, remote_path: str, local_path: Path, *, within: Path, timeout: float = 300.0
    ) -> Transfer:
        """Download ``remote_path`` into a file of the host (atomically), for trusted internal
        callers only: ``local_path`` must lie inside the directory ``within`` (ValueError, and
        nothing asked of the agent, otherwise). On a checksum mismatch it is left untouched."""
        dest = _confined(local_path, within)
        tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}-{threading.get_ident()}")
        try:
            with open(tmp, "wb") as fh:
                result = self._get(remote_path, fh, timeout)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return result

    def read_file(self, remote_path: str, *, timeout: float = 300.0) -> bytes:
        import io

        buf = io.BytesIO()
        self._get(remote_path, buf, timeout)
        return buf.getvalue()

    def _get(self, remote_path: str, fh: IO[bytes], timeout: float) -> Transfer:
        deadline = time.monotonic() + timeout
        digest = hashlib.sha256()
        size = 0
        call = self._open_call()
        try:
            self._send({"op": "get", "id": call.id, "path": remote_path})
            while True:
                head, data = self._next(call, deadline, "get")
                kind = head.get("kind")
                if kind == "data":
                    digest.update(data)
                    size += len(data)
                    fh.write(data)
                elif kind == "meta":
                    continue
                elif kind == "result":
                    break
                else:
                    raise AgentProtocolError(f"unexpected get frame: {head}")
        finally:
            self._close_call(call)
        ours = digest.hexdigest()
        if head.get("sha256") != ours or head.get("size") != size:
            raise AgentError(
                "checksum_mismatch",
                f"received {size} bytes with sha256 {ours}; agent sent {head.get('size')} "
                f"bytes with sha256 {head.get('sha256')}",
            )
        return Transfer(remote_path, size, ours)

    def list(self, path: str, *, timeout: float | None = None) -> list[DirEntry]:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        entries: list[DirEntry] = []
        call = self._open_call()
        try:
            self._send({"op": "list", "id": call.id, "path": path})
            while True:
                head, _ = self._next(call, deadline, "list")
                if head.get("kind") == "entries":
                    entries.extend(DirEntry(**e) for e in head["entries"])
                elif head.get("kind") == "result":
                    return sorted(entries, key=lambda e: e.name)
                else:
                    raise AgentProtocolError(f"unexpected list frame: {head}")
        finally:
            self._close_call(call)

    def stat(self, path: str, *, follow_symlinks: bool = True) -> FileStat:
        head = self._request({"op": "stat", "path": path, "follow_symlinks": follow_symlinks})
        return FileStat(
            path=head["path"],
            type=head["type"],
            size=head["size"],
            mode=head["mode"],
            mtime=head["mtime"],
            uid=head["uid"],
            gid=head["gid"],
            target=head.get("target"),
        )

    def health(self) -> dict[str, Any]:
        """uptime_s, load, processes, memory_kib, agent_version, time, hostname."""
        head = self._request({"op": "health"})
        return {k: v for k, v in head.items() if k not in ("id", "kind")}

    def configure(
        self,
        *,
        time: float | None = None,  # noqa: A002 - the protocol's field name
        hostname: str | None = None,
        mac: str | None = None,
        address: str | None = None,
        gateway: str | None = None,
        dns: builtins.list[str] | None = None,  # `list` is a method of this class
        interface: str | None = None,
        match_mac: str | None = None,
        reseed: bool = True,
    ) -> dict[str, Any]:
        """Give the guest its identity in one request: wall clock (unix time), hostname, and
        one NIC as in ``network`` (the one whose MAC is ``match_mac`` now, or ``interface``;
        ``eth0`` when neither is given). The NIC's outcome is the result's ``network``.

        Used after every snapshot restore, so clones differ and the clock is right again.
        ``reseed``: with ``ENTROPY_BYTES`` fresh random bytes of the host's, which the agent
        mixes into the guest's pool before it reseeds the kernel's CRNG: guests restored from
        one saved state (clones, forks, pool members) must not share their random numbers. The
        bytes are never logged; an agent that predates it ignores them (the result's
        ``applied`` says ``entropy ... reseeded`` when it did).
        """
        head = self._request(
            self.configure_request(
                time=time,
                hostname=hostname,
                mac=mac,
                address=address,
                gateway=gateway,
                dns=dns,
                interface=interface,
                match_mac=match_mac,
                reseed=reseed,
            )
        )
        return {k: v for k, v in head.items() if k not in ("id", "kind")}

    def configure_request(
        self,
        *,
        time: float | None = None,  # noqa: A002 - the protocol's field name
        hostname: str | None = None,
        mac: str | None = None,
        address: str | None = None,
        gateway: str | None = None,
        dns: builtins.list[str] | None = None,
        interface: str | None = None,
        match_mac: str | None = None,
        reseed: bool = True,
    ) -> dict[str, Any]:
        """The ``configure`` request ``configure`` sends (for ``pipeline``)."""
        header: dict[str, Any] = {"op": "configure"}
        if reseed:
            header["entropy"] = base64.b64encode(os.urandom(ENTROPY_BYTES)).decode()
        if time is not None:
            header["time"] = time
        if hostname is not None:
            header["hostname"] = hostname
        network = {
            k: v
            for k, v in (
                ("mac", mac),
                ("address", address),
                ("gateway", gateway),
                ("dns", dns),
                ("interface", interface),
                ("match_mac", match_mac),
            )
            if v is not None
        }
        if network:
            if match_mac is not None:
                self._require("network")  # an older agent would ignore match_mac
            header["network"] = network
        return header

    def network(
        self,
        *,
        match_mac: str | None = None,
        interface: str | None = None,
        mac: str | None = None,
        address: str | None = None,
        gateway: str | None = None,
        dns: builtins.list[str] | None = None,
        up: bool = True,
        timeout: float = 15.0,
    ) -> dict[str, Any]:
        """Configure one guest NIC: the one whose MAC is ``match_mac`` now (or ``interface`` by
        name). In order: set its MAC to ``mac`` (a VM restored from a template gets its own MAC
        this way; the VMM's device follows), bring it up (or down), replace its addresses of
        that family with ``address`` (CIDR), the default route with one via ``gateway``, and
        the resolvers with ``dns``. Returns ``interface``, ``mac``, ``applied`` and ``planned``
        (``dry_run`` off a guest). The agent refuses the whole request if any field is invalid.
        """
        if match_mac is None and interface is None:
            raise ValueError("give match_mac or interface")
        header: dict[str, Any] = {"op": "network", "up": up}
        for key, value in (
            ("match_mac", match_mac),
            ("interface", interface),
            ("mac", mac),
            ("address", address),
            ("gateway", gateway),
            ("dns", dns),
        ):
            if value is not None:
                header[key] = value
        self._require("network")
        head = self._request(header, timeout=timeout)
        return {k: v for k, v in head.items() if k not in ("id", "kind")}

    def shutdown(self, action: str = "poweroff", *, timeout: float = 10.0) -> None:
        """Ask the guest to power off or reboot; returns once the agent has accepted."""
        self._request({"op": "shutdown", "action": action}, timeout=timeout)


def _keep(kept: bytearray, data: bytes, limit: int | None) -> None:
    if limit is None:
        kept += data
    elif len(kept) < limit:
        kept += data[: limit - len(kept)]


def _check_source(source: object) -> None:
    """Refuse a host file name as an upload source (see ``Source``)."""
    if isinstance(source, str | os.PathLike):
        raise TypeError(
            "an upload source is bytes, a binary stream or byte chunks, never a file name "
            "(use put_host_file for a file of the host)"
        )


def _confined(path: Path, within: Path) -> Path:
    """``path`` resolved, if it lies inside the directory ``within``; else ValueError."""
    if not isinstance(path, Path) or not isinstance(within, Path):
        raise TypeError("host paths are given as pathlib.Path")
    resolved, root = path.resolve(), within.resolve()
    if not resolved.is_relative_to(root) or resolved == root:
        raise ValueError(f"{path} is not a file inside {within}")
    return resolved


def _iter_source(source: Source, chunk_size: int = DEFAULT_CHUNK) -> Iterator[bytes]:
    _check_source(source)
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source)
        for i in range(0, len(view), chunk_size):
            yield bytes(view[i : i + chunk_size])
        return
    if hasattr(source, "read"):
        while chunk := source.read(chunk_size):
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise TypeError("an upload stream must be opened in binary mode")
            yield bytes(chunk)
        return
    for chunk in source:
        if not isinstance(chunk, bytes | bytearray | memoryview):
            raise TypeError("an upload's chunks must be bytes")
        for i in range(0, len(chunk), chunk_size):
            yield bytes(chunk[i : i + chunk_size])
