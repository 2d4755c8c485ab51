#!/usr/bin/env python3
"""MicroVM Sandbox guest agent: runs commands and moves files for the host, protocol v2.

One stdlib-only file, started as ``python3 -I -S sandbox_agent.py --guest`` by the guest's init.
It serves the framed protocol described in docs/agent-protocol.md over:

- the virtio-serial port named ``sandbox.agent`` (QEMU), found through /sys/class/virtio-ports
  because the guest has no udev;
- AF_VSOCK port 1024 when the kernel has a vsock transport (Cloud Hypervisor's hybrid vsock);
- ``--listen-unix PATH`` or ``--stdio`` when run on a host, for tests.

Start-up time matters (Python starts in about 2 s under TCG), so only what the first hello needs
is imported at module load; subprocess, hashlib, socket and friends are imported on first use.
Every request carries an id and runs concurrently with the others (threads); a bad frame gets an
error frame and the agent keeps serving: it never exits because of what a client sent.

Every request but ``enroll`` carries the host's credential for this guest (``auth``): whoever
can open the guest's agent socket on the host cannot drive it without it. The agent keeps only
its SHA-256 (in /run: it survives a snapshot restore, not a reboot), takes the first credential
it is given (``enroll``, done by the host right after boot) and changes it on ``rotate``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

# 2: every request but enroll carries the credential (1 had none: refused, it is the hole 2 shuts)
PROTOCOL_VERSION = 2
SUPPORTED_PROTOCOLS = (2,)
AGENT_VERSION = "2.0.0"

MAGIC = b"\x7fSBA"
PREFIX_LEN = 12  # magic + header length (u32 BE) + payload length (u32 BE)
MAX_FRAME = 1 << 20  # header + payload
CHUNK = 256 * 1024  # file chunk size; leaves room for the header inside MAX_FRAME
EXEC_READ = 64 * 1024
LIST_BATCH = 500
# A frame that is too large but whose header is readable is skipped by length (the client gets
# an error for that request id); beyond this the lengths are more likely garbage, so resync by
# scanning for the next magic instead of swallowing gigabytes.
MAX_SKIP = 64 << 20
MAX_ACTIVE = 256
# After a rename the console's login shell is started again once the host is quiet this long
# (or at the latest after the second figure): see ``Session._restart_console_when_quiet``.
CONSOLE_RESTART_QUIET_S = 0.5
CONSOLE_RESTART_MAX_WAIT_S = 5.0
# Uploads that failed or were cut off: the data frames the host had already sent for them are
# dropped without a reply (one error per stale chunk would flood, and over virtio-serial block,
# the next connection). The last ones are remembered per stream.
ABORTED_REMEMBERED = 64
VSOCK_PORT = 1024
PORT_NAME = "sandbox.agent"
# Where a guest keeps the SHA-256 of its credential: tmpfs, root only. A snapshot restore keeps
# it (the host then rotates it at once); a reboot forgets it (the host enrolls the guest again).
CREDENTIAL_FILE = "/run/sandbox-agent/credential"
CREDENTIAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

OPS = (
    "hello", "ping", "exec", "stdin", "signal", "put", "data", "get", "list", "stat", "health",
    "configure", "network", "shutdown", "enroll", "rotate",
)  # fmt: skip

_started = time.monotonic()


def log(message: str) -> None:
    sys.stderr.write(f"sandbox-agent[{time.monotonic() - _started:9.3f}] {message}\n")
    sys.stderr.flush()


class RequestError(Exception):
    """A request failed in a way the client should see: becomes an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _os_error(exc: OSError) -> RequestError:
    import errno

    code = {
        errno.ENOENT: "not_found",
        errno.EACCES: "permission_denied",
        errno.EPERM: "permission_denied",
        errno.EEXIST: "exists",
        errno.ENOTDIR: "not_a_directory",
        errno.EISDIR: "is_a_directory",
        errno.ENOSPC: "no_space",
    }.get(exc.errno or 0, "io_error")
    where = f": {exc.filename}" if exc.filename else ""
    return RequestError(code, f"{exc.strerror or exc}{where}")


def encode_frame(header: dict, payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join(
        (MAGIC, len(head).to_bytes(4, "big"), len(payload).to_bytes(4, "big"), head, payload)
    )


class FrameParser:
    """Incremental decoder: feed bytes, get ("frame", header, payload) or ("error", id, code, msg).

    It never raises on bad input. Garbage before a magic is skipped (one error per run of
    garbage); an oversized frame with a readable header is skipped by its declared length.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.skip = 0  # payload bytes of an oversized frame still to discard
        self.in_garbage = False

    def reset(self) -> None:
        self.buf.clear()
        self.skip = 0
        self.in_garbage = False

    def feed(self, data: bytes) -> list[tuple]:
        out: list[tuple] = []
        if self.skip:
            drop = min(self.skip, len(data))
            self.skip -= drop
            data = data[drop:]
        self.buf += data
        buf = self.buf
        while len(buf) >= PREFIX_LEN or (buf and buf[:4] != MAGIC[: len(buf)]):
            if buf[:4] != MAGIC:
                at = buf.find(MAGIC)
                if not self.in_garbage:
                    self.in_garbage = True
                    out.append(("error", None, "bad_frame", "bytes outside a frame skipped"))
                if at < 0:
                    # Keep a tail that could be the start of the next magic.
                    keep = next((k for k in (3, 2, 1) if buf.endswith(MAGIC[:k])), 0)
                    del buf[: len(buf) - keep]
                    break
                del buf[:at]
                continue
            if len(buf) < PREFIX_LEN:
                break
            hlen = int.from_bytes(buf[4:8], "big")
            plen = int.from_bytes(buf[8:12], "big")
            if hlen == 0 or hlen > MAX_FRAME:
                out.append(("error", None, "bad_frame", f"bad header length {hlen}"))
                del buf[:1]  # resync on the next magic
                self.in_garbage = True
                continue
            if hlen + plen > MAX_FRAME:
                if len(buf) < PREFIX_LEN + hlen:
                    break
                req_id = self._peek_id(bytes(buf[PREFIX_LEN : PREFIX_LEN + hlen]))
                if plen > MAX_SKIP or req_id is False:
                    out.append(("error", None, "bad_frame", "oversized frame, resynchronising"))
                    del buf[:1]
                    self.in_garbage = True
                    continue
                out.append(
                    (
                        "error",
                        req_id,
                        "frame_too_large",
                        f"frame of {hlen + plen} bytes exceeds the maximum of {MAX_FRAME}",
                    )
                )
                del buf[: PREFIX_LEN + hlen]
                drop = min(plen, len(buf))
                del buf[:drop]
                self.skip = plen - drop
                self.in_garbage = False
                if self.skip:
                    break
                continue
            end = PREFIX_LEN + hlen + plen
            if len(buf) < end:
                break
            self.in_garbage = False
            head = bytes(buf[PREFIX_LEN : PREFIX_LEN + hlen])
            payload = bytes(buf[PREFIX_LEN + hlen : end])
            del buf[:end]
            try:
                header = json.loads(head)
            except ValueError:
                out.append(("error", None, "bad_frame", "header is not valid JSON"))
                continue
            if not isinstance(header, dict):
                out.append(("error", None, "bad_frame", "header is not a JSON object"))
                continue
            out.append(("frame", header, payload))
        return out

    @staticmethod
    def _peek_id(head: bytes) -> object:
        try:
            header = json.loads(head)
        except ValueError:
            return False
        return header.get("id") if isinstance(header, dict) else False


# --------------------------------------------------------------------------- transports


class Transport:
    """A byte stream. ``persistent`` streams (virtio-serial) survive the host disconnecting."""

    persistent = False
    name = "stream"

    def read(self) -> bytes:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class FdTransport(Transport):
    def __init__(self, rfd: int, wfd: int, name: str) -> None:
        self.rfd, self.wfd, self.name = rfd, wfd, name

    def read(self) -> bytes:
        return os.read(self.rfd, CHUNK + PREFIX_LEN + 4096)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.wfd, view) :]


class VirtioSerialTransport(FdTransport):
    """The guest end of a virtio-serial port.

    read() returns EOF while no host is connected: the caller polls. A write while the host is
    away blocks until it reconnects (the kernel's choice), so output is delayed, not lost.
    """

    persistent = True

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        super().__init__(fd, fd, f"virtio-serial:{path}")


class SocketTransport(Transport):
    def __init__(self, sock, name: str) -> None:  # noqa: ANN001 - socket imported lazily
        self.sock, self.name = sock, name

    def read(self) -> bytes:
        return self.sock.recv(CHUNK + PREFIX_LEN + 4096)

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------- requests


def _str_list(value: object, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequestError("bad_request", f"{field} must be a list of strings")
    return value


def _path(req: dict, field: str = "path") -> str:
    value = req.get(field)
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise RequestError("bad_request", f"{field} must be an absolute path")
    return value


def _number(req: dict, field: str, *, positive: bool = False) -> float | None:
    value = req.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError("bad_request", f"{field} must be a number")
    if positive and value <= 0:
        raise RequestError("bad_request", f"{field} must be positive")
    return float(value)


def _wait_exit(proc, timeout: float | None) -> None:  # noqa: ANN001 - a subprocess.Popen
    """``proc.wait(timeout)``, but asleep until the exit rather than polling for it.

    With a timeout, ``Popen.wait`` polls ``waitpid(WNOHANG)`` between sleeps of 0.5 ms doubling
    up to 50 ms; a process's pipes close a moment before it can be reaped, so a short command
    often paid a sleep or two: about 3 ms per exec of ``true`` under TCG. A pidfd becomes
    readable at the exit, so ``poll`` wakes then. Without pidfds (old kernels, other systems):
    ``Popen.wait`` as before. subprocess.TimeoutExpired at the timeout."""
    import select
    import subprocess

    if timeout is None or proc.returncode is not None:
        proc.wait()
        return
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        proc.wait(timeout)
        return
    try:
        # The child is not reaped before ``proc.wait`` (only a ``send_signal`` of another thread
        # could, and then returncode is set): the pidfd is the child's.
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if proc.returncode is None and not poller.poll(int(timeout * 1000) + 1):
            raise subprocess.TimeoutExpired(proc.args, timeout)
    finally:
        os.close(pidfd)
    proc.wait()


class Exec:
    """One running process: its stdin buffer is fed by the session's reader thread."""

    def __init__(self, session: Session, req_id: object, req: dict, stdin_data: bytes) -> None:
        argv = _str_list(req.get("argv"), "argv")
        if not argv:
            raise RequestError("bad_request", "argv must not be empty")
        env_req = req.get("env") or {}
        if not isinstance(env_req, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env_req.items()
        ):
            raise RequestError("bad_request", "env must map strings to strings")
        cwd = req.get("cwd")
        if cwd is not None and not isinstance(cwd, str):
            raise RequestError("bad_request", "cwd must be a string")
        self.stdin_mode = req.get("stdin", "data" if stdin_data else "none")
        if self.stdin_mode not in ("none", "data", "stream"):
            raise RequestError("bad_request", "stdin must be none, data or stream")
        self.session, self.id = session, req_id
        self.argv, self.cwd = argv, cwd
        base = {} if req.get("clear_env") else dict(os.environ)
        base.setdefault("PATH", DEFAULT_PATH)
        base.update(env_req)
        self.env = base
        self.timeout = _number(req, "timeout", positive=True)
        self.pending = [stdin_data] if stdin_data else []
        self.stdin_eof = self.stdin_mode != "stream"
        self.lock = threading.Lock()
        self.wake_r, self.wake_w = os.pipe()
        self.proc = None
        self.done = False

    # Called from the reader thread.
    def feed_stdin(self, data: bytes, eof: bool) -> None:
        with self.lock:
            if data:
                self.pending.append(data)
            if eof:
                self.stdin_eof = True
        self._wake()

    def kill(self, signum: int) -> None:
        import signal

        # The group outlives its leader while any member lives, and its id cannot be reused
        # until then, so killpg is right even after the leader has been reaped.
        proc = self.proc
        if proc is not None:
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass
            except PermissionError:
                if proc.returncode is None:
                    proc.send_signal(signum)
        if signum == signal.SIGKILL:
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def run(self) -> None:
        import select
        import signal
        import subprocess

        # The process's time starts before the spawn: fork and exec are part of running it
        # (under TCG they cost tens of milliseconds), not protocol overhead.
        started = time.monotonic()
        try:
            try:
                self.proc = proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL if self.stdin_mode == "none" else subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=self.env,
                    cwd=self.cwd,
                    start_new_session=True,  # own process group: a timeout kills the tree
                    bufsize=0,
                )
            except OSError as exc:
                err = _os_error(exc)
                self.session.send_error(self.id, "exec_failed", f"{err.code}: {err.message}")
                return
            deadline = started + self.timeout if self.timeout else None
            timed_out = False
            kill_deadline = None  # after a kill, how long we keep draining pipes
            poller = select.poll()
            fds: dict[int, str] = {}
            for stream, kind in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
                fds[stream.fileno()] = kind
                poller.register(stream.fileno(), select.POLLIN)
            poller.register(self.wake_r, select.POLLIN)
            stdin_fd = proc.stdin.fileno() if proc.stdin else None
            if stdin_fd is not None:
                os.set_blocking(stdin_fd, False)
            stdin_registered = False
            while fds or stdin_fd is not None:
                if stdin_fd is not None:
                    stdin_fd, stdin_registered = self._pump_stdin(
                        poller, stdin_fd, stdin_registered
                    )
                    if not fds and stdin_fd is None:
                        break
                now = time.monotonic()
                if deadline is not None and not timed_out and now >= deadline:
                    timed_out = True
                    self.kill(signal.SIGKILL)
                    kill_deadline = now + 2.0
                if kill_deadline is not None and now >= kill_deadline:
                    break  # a process outside the group still holds the pipes: give up on them
                limit = min(x for x in (deadline, kill_deadline, now + 3600) if x is not None)
                wait_ms = max(0, int((limit - now) * 1000)) + 1
                if not fds:
                    wait_ms = min(wait_ms, 50)  # only stdin left: notice the process exiting
                for fd, _event in poller.poll(wait_ms):
                    if fd == self.wake_r:
                        os.read(self.wake_r, 4096)
                        continue
                    if fd == stdin_fd:
                        continue  # writable: _pump_stdin handles it at the top of the loop
                    data = os.read(fd, EXEC_READ)
                    if data:
                        self.session.send({"id": self.id, "kind": fds[fd]}, data)
                    else:
                        poller.unregister(fd)
                        del fds[fd]
                if stdin_fd is not None and proc.poll() is not None:
                    if stdin_registered:
                        poller.unregister(stdin_fd)
                    proc.stdin.close()  # nobody will read it any more
                    proc.stdin = None
                    stdin_fd = None
            remaining = None
            if deadline is not None and not timed_out:
                remaining = max(0.0, deadline - time.monotonic())
            try:
                _wait_exit(proc, remaining)
            except subprocess.TimeoutExpired:
                timed_out = True
                self.kill(signal.SIGKILL)
                proc.wait()
            duration = time.monotonic() - started
            if timed_out:
                self.kill(signal.SIGKILL)  # stragglers of the tree that outlived the leader
            code = proc.returncode
            self.session.send(
                {
                    "id": self.id,
                    "kind": "exit",
                    "exit_code": code if code >= 0 else None,
                    "signal": -code if code < 0 else None,
                    "timed_out": timed_out,
                    "duration_s": round(duration, 6),
                    "pid": proc.pid,
                }
            )
        except Exception as exc:  # noqa: BLE001 - report, never die
            log(f"exec {self.argv!r} failed: {exc!r}")
            self.session.send_error(self.id, "internal", repr(exc))
        finally:
            self.done = True
            self.session.finish(self.id)
            for stream in (self.proc.stdout, self.proc.stderr) if self.proc else ():
                stream.close()
            if self.proc and self.proc.stdin:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
            os.close(self.wake_r)
            os.close(self.wake_w)

    def _pump_stdin(self, poller, fd: int, registered: bool) -> tuple[int | None, bool]:  # noqa: ANN001
        import select

        with self.lock:
            while self.pending:
                chunk = self.pending[0]
                try:
                    n = os.write(fd, chunk)
                except BlockingIOError:
                    break
                except BrokenPipeError:
                    self.pending.clear()  # the process stopped reading: drop the rest
                    self.stdin_eof = True
                    break
                if n == len(chunk):
                    self.pending.pop(0)
                else:
                    self.pending[0] = chunk[n:]
            want_out = bool(self.pending)
            close = not self.pending and self.stdin_eof
        if close:
            if registered:
                poller.unregister(fd)
            self.proc.stdin.close()
            self.proc.stdin = None
            return None, False
        if want_out and not registered:
            poller.register(fd, select.POLLOUT)
            return fd, True
        if not want_out and registered:
            poller.unregister(fd)
            return fd, False
        return fd, registered


class Put:
    """An incoming file: chunks go to a temporary file beside the target, renamed at the end."""

    def __init__(self, req: dict) -> None:
        import hashlib

        self.path = _path(req)
        self.size = _number(req, "size")
        self.sha256 = req.get("sha256")
        mode = req.get("mode", 0o644)
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
            raise RequestError("bad_request", "mode must be an integer permission mask")
        self.mode = mode
        parent, name = os.path.split(self.path)
        if not name:
            raise RequestError("bad_request", "path names a directory")
        try:
            if req.get("mkdirs"):
                os.makedirs(parent, exist_ok=True)
            if os.path.isdir(self.path):
                raise RequestError("is_a_directory", f"{self.path} is a directory")
            self.tmp = os.path.join(parent, f".{name}.sbx-{os.urandom(6).hex()}")
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _os_error(exc) from exc
        self.hash = hashlib.sha256()
        self.written = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.hash.update(data)
        self.written += len(data)

    def finish(self, sha256: object) -> dict:
        expected = sha256 or self.sha256
        os.close(self.fd)
        self.fd = -1
        digest = self.hash.hexdigest()
        if not isinstance(expected, str):
            self.abort()
            raise RequestError("bad_request", "sha256 is required (in put or in the last chunk)")
        if self.size is not None and self.written != self.size:
            self.abort()
            raise RequestError("size_mismatch", f"got {self.written} bytes, expected {self.size}")
        if digest != expected.lower():
            self.abort()
            raise RequestError("checksum_mismatch", f"sha256 {digest} != expected {expected}")
        os.chmod(self.tmp, self.mode)
        os.replace(self.tmp, self.path)
        return {"kind": "result", "size": self.written, "sha256": digest, "path": self.path}

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


def _file_type(mode: int) -> str:
    import stat

    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _stat_dict(st: os.stat_result) -> dict:
    return {
        "type": _file_type(st.st_mode),
        "size": st.st_size,
        "mode": st.st_mode & 0o7777,
        "mtime": st.st_mtime,
        "uid": st.st_uid,
        "gid": st.st_gid,
    }


def _credential_value(value: object, field: str) -> str:
    if (
        not isinstance(value, str)
        or not 32 <= len(value) <= 256
        or not CREDENTIAL_CHARS.issuperset(value)
    ):
        raise RequestError(
            "bad_request", f"{field} must be 32 to 256 characters of A-Z a-z 0-9 - _"
        )
    return value


class Credential:
    """The host's credential for this guest, kept as its SHA-256 only (in memory and, when
    ``path`` is given, in that root-only file), so neither the file nor a snapshot of the
    guest's memory holds a value that opens the agent."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.digest: bytes | None = None
        if path:
            try:
                with open(path) as fh:
                    self.digest = bytes.fromhex(fh.read().strip()) or None
            except (OSError, ValueError):
                self.digest = None

    @staticmethod
    def _hash(value: str) -> bytes:
        import hashlib

        return hashlib.sha256(value.encode()).digest()

    def refusal(self, presented: object) -> RequestError | None:
        """None when ``presented`` is the credential, else why the request is refused."""
        import hmac

        digest = self.digest
        if digest is None:
            return RequestError("not_enrolled", "this agent has no credential yet: enroll it")
        if not isinstance(presented, str) or not hmac.compare_digest(self._hash(presented), digest):
            return RequestError("unauthorized", "missing or wrong credential")
        return None

    def replace(self, new: str, *, current: object, enrolling: bool) -> None:
        """Enroll (no credential yet) or rotate (``current`` must be the credential)."""
        with self.lock:
            if enrolling:
                if self.digest is not None:
                    raise RequestError("already_enrolled", "this agent has a credential")
            else:
                refused = self.refusal(current)
                if refused is not None:
                    raise refused
            digest = self._hash(new)
            if self.path:
                self._persist(digest)
            self.digest = digest

    def _persist(self, digest: bytes) -> None:
        assert self.path
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        tmp = f"{self.path}.new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, digest.hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)


class Options:
    """What differs between a guest and a test run on a host."""

    def __init__(
        self,
        *,
        apply_configure: bool,
        system_shutdown: bool,
        credential: Credential | None = None,
    ) -> None:
        self.apply_configure = apply_configure
        self.system_shutdown = system_shutdown
        # One per agent process: every stream (virtio-serial, vsock, unix) checks the same.
        self.credential = credential or Credential(None)


class Session:
    """One client stream: decodes requests, runs them, serialises replies onto the stream."""

    def __init__(self, transport: Transport, options: Options) -> None:
        self.transport = transport
        self.options = options
        self.wlock = threading.Lock()
        self.active: dict[object, object] = {}  # id -> Exec | Put | True (other running ops)
        self.alock = threading.Lock()
        self.closed = False
        self.aborted: dict[object, None] = {}  # ids of failed uploads, oldest first
        self.last_input = time.monotonic()  # when the host last sent anything

    # ---- output
    def send(self, header: dict, payload: bytes = b"") -> None:
        data = encode_frame(header, payload)
        with self.wlock:
            if self.closed:
                return
            try:
                self.transport.write(data)
            except OSError as exc:
                log(f"{self.transport.name}: write failed: {exc}")
                self.closed = True

    def send_error(self, req_id: object, code: str, message: str) -> None:
        self.send({"id": req_id, "kind": "error", "code": code, "message": message})

    def finish(self, req_id: object) -> None:
        with self.alock:
            self.active.pop(req_id, None)

    def _claim(self, req_id: object, value: object) -> None:
        with self.alock:
            if req_id in self.active:
                raise RequestError("duplicate_id", f"request {req_id!r} is still running")
            if len(self.active) >= MAX_ACTIVE:
                raise RequestError("busy", f"more than {MAX_ACTIVE} requests running")
            self.active[req_id] = value

    def _spawn(self, req_id: object, fn, *args: object) -> None:  # noqa: ANN001
        def target() -> None:
            try:
                fn(*args)
            except RequestError as exc:
                self.send_error(req_id, exc.code, exc.message)
            except OSError as exc:
                err = _os_error(exc)
                self.send_error(req_id, err.code, err.message)
            except Exception as exc:  # noqa: BLE001 - report, never die
                log(f"request {req_id!r} failed: {exc!r}")
                self.send_error(req_id, "internal", repr(exc))
            finally:
                self.finish(req_id)

        threading.Thread(target=target, daemon=True).start()

    # ---- input
    def serve(self) -> None:
        parser = FrameParser()
        log(f"serving on {self.transport.name}")
        while True:
            try:
                data = self.transport.read()
            except OSError as exc:
                log(f"{self.transport.name}: read failed: {exc}")
                data = b""
            if not data:
                if not self.transport.persistent:
                    break
                # virtio-serial: no host connected. Partial frames of the last connection are
                # meaningless now, and so are uploads it had in flight.
                if parser.buf or parser.skip:
                    parser.reset()
                self._abort_puts()
                time.sleep(0.1)
                continue
            self.last_input = time.monotonic()
            for item in parser.feed(data):
                if item[0] == "error":
                    self.send_error(item[1], item[2], item[3])
                else:
                    self.dispatch(item[1], item[2])
        self.close()

    def close(self) -> None:
        import signal

        with self.wlock:
            self.closed = True
        with self.alock:
            active = list(self.active.values())
        for item in active:
            if isinstance(item, Exec):
                item.kill(signal.SIGKILL)
        self._abort_puts()
        self.transport.close()
        log(f"{self.transport.name}: closed")

    def _abort_puts(self) -> None:
        with self.alock:
            puts = [(k, v) for k, v in self.active.items() if isinstance(v, Put)]
            for key, _ in puts:
                del self.active[key]
        for key, put in puts:
            put.abort()
            self._remember_aborted(key)

    def _remember_aborted(self, req_id: object) -> None:
        with self.alock:
            self.aborted.pop(req_id, None)
            self.aborted[req_id] = None
            while len(self.aborted) > ABORTED_REMEMBERED:
                del self.aborted[next(iter(self.aborted))]

    def dispatch(self, req: dict, payload: bytes) -> None:
        req_id = req.get("id")
        op = req.get("op")
        try:
            if req_id is None or isinstance(req_id, bool) or not isinstance(req_id, int | str):
                raise RequestError("bad_request", "every request needs an integer or string id")
            handler = getattr(self, f"op_{op}", None) if op in OPS else None
            if handler is None:
                raise RequestError("unknown_op", f"unknown op {op!r}")
            if op != "enroll":
                if op == "hello":
                    _common_protocol(req)  # an old client learns why, not just "unauthorized"
                # Every request, not only the hello: a virtio-serial stream outlives the host's
                # connections, so no "this connection said hello" state can be trusted.
                refused = self.options.credential.refusal(req.get("auth"))
                if refused is not None:
                    raise refused
            handler(req_id, req, payload)
        except RequestError as exc:
            self.send_error(req_id, exc.code, exc.message)
        except OSError as exc:
            err = _os_error(exc)
            self.send_error(req_id, err.code, err.message)
        except Exception as exc:  # noqa: BLE001 - report, never die
            log(f"{op} failed: {exc!r}")
            self.send_error(req_id, "internal", repr(exc))

    # ---- operations (run on the reader thread unless they may block)
    def op_hello(self, req_id: object, req: dict, _payload: bytes) -> None:
        common = _common_protocol(req)
        try:
            with open("/proc/sys/kernel/random/boot_id") as fh:
                boot_id = fh.read().strip()
        except OSError:
            boot_id = None
        self.send(
            {
                "id": req_id,
                "kind": "hello",
                "protocol": max(common),
                "agent_version": AGENT_VERSION,
                "capabilities": list(OPS),
                "max_frame": MAX_FRAME,
                "chunk_size": CHUNK,
                "os": sys.platform,
                "hostname": os.uname().nodename,
                "boot_id": boot_id,
                "pid": os.getpid(),
                "uptime_s": _uptime(),
                "transport": self.transport.name,
            }
        )

    def op_enroll(self, req_id: object, req: dict, _payload: bytes) -> None:
        new = _credential_value(req.get("credential"), "credential")
        self.options.credential.replace(new, current=None, enrolling=True)
        log("enrolled: the host's credential is set")
        self.send({"id": req_id, "kind": "result", "enrolled": True})

    def op_rotate(self, req_id: object, req: dict, _payload: bytes) -> None:
        new = _credential_value(req.get("credential"), "credential")
        self.options.credential.replace(new, current=req.get("auth"), enrolling=False)
        log("credential rotated")
        self.send({"id": req_id, "kind": "result", "rotated": True})

    def op_ping(self, req_id: object, _req: dict, _payload: bytes) -> None:
        self.send({"id": req_id, "kind": "pong"})

    def op_exec(self, req_id: object, req: dict, payload: bytes) -> None:
        proc = Exec(self, req_id, req, payload)
        self._claim(req_id, proc)
        threading.Thread(target=proc.run, daemon=True).start()

    def op_stdin(self, req_id: object, req: dict, payload: bytes) -> None:
        proc = self.active.get(req_id)
        if not isinstance(proc, Exec) or proc.stdin_mode != "stream":
            raise RequestError("unknown_id", f"no exec {req_id!r} with streamed stdin")
        proc.feed_stdin(payload, bool(req.get("eof")))

    def op_signal(self, req_id: object, req: dict, _payload: bytes) -> None:
        target = self.active.get(req.get("target"))
        signum = req.get("signal", 15)
        if not isinstance(target, Exec):
            raise RequestError("unknown_id", f"no running exec {req.get('target')!r}")
        if not isinstance(signum, int) or isinstance(signum, bool) or not 0 < signum < 65:
            raise RequestError("bad_request", "signal must be a signal number")
        target.kill(signum)
        self.send({"id": req_id, "kind": "result"})

    def op_put(self, req_id: object, req: dict, _payload: bytes) -> None:
        with self.alock:
            if req_id in self.active:
                raise RequestError("duplicate_id", f"request {req_id!r} is still running")
        put = Put(req)
        try:
            self._claim(req_id, put)
        except RequestError:
            put.abort()
            raise
        with self.alock:
            self.aborted.pop(req_id, None)  # the id is in use again: its data is new
        self.send({"id": req_id, "kind": "ready", "chunk_size": CHUNK})

    def op_data(self, req_id: object, req: dict, payload: bytes) -> None:
        put = self.active.get(req_id)
        if not isinstance(put, Put):
            if req_id in self.aborted:
                return  # sent before the host learnt that the upload failed: drop it
            raise RequestError("unknown_id", f"no upload {req_id!r} in progress")
        if req.get("abort"):
            # The host gives up on the upload: nothing is kept, and no reply (the host may
            # already be gone, and over virtio-serial a reply would wait for its return).
            self.finish(req_id)
            put.abort()
            self._remember_aborted(req_id)
            return
        try:
            if payload:
                put.write(payload)
            if req.get("eof"):
                self.finish(req_id)
                self.send({"id": req_id, **put.finish(req.get("sha256"))})
        except BaseException:
            self.finish(req_id)
            put.abort()
            if not req.get("eof"):
                self._remember_aborted(req_id)
            raise

    def op_get(self, req_id: object, req: dict, _payload: bytes) -> None:
        path = _path(req)
        self._claim(req_id, True)
        self._spawn(req_id, self._get, req_id, path)

    def _get(self, req_id: object, path: str) -> None:
        import hashlib

        digest = hashlib.sha256()
        size = 0
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if _file_type(st.st_mode) != "file":
                raise RequestError("not_a_file", f"{path} is not a regular file")
            meta = {"id": req_id, "kind": "meta", "size": st.st_size, "mode": st.st_mode & 0o7777}
            self.send(meta)
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                self.send({"id": req_id, "kind": "data"}, chunk)
        self.send({"id": req_id, "kind": "result", "size": size, "sha256": digest.hexdigest()})

    def op_list(self, req_id: object, req: dict, _payload: bytes) -> None:
        path = _path(req)
        entries = []
        count = 0
        with os.scandir(path) as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # vanished while listing
                entries.append({"name": entry.name, **_stat_dict(st)})
                if len(entries) == LIST_BATCH:
                    count += len(entries)
                    self.send({"id": req_id, "kind": "entries", "entries": entries})
                    entries = []
        count += len(entries)
        if entries:
            self.send({"id": req_id, "kind": "entries", "entries": entries})
        self.send({"id": req_id, "kind": "result", "count": count})

    def op_stat(self, req_id: object, req: dict, _payload: bytes) -> None:
        path = _path(req)
        st = os.stat(path, follow_symlinks=bool(req.get("follow_symlinks", True)))
        result = {"id": req_id, "kind": "result", "path": path, **_stat_dict(st)}
        if result["type"] == "symlink":
            result["target"] = os.readlink(path)
        self.send(result)

    def op_health(self, req_id: object, _req: dict, _payload: bytes) -> None:
        meminfo: dict[str, int] = {}
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemFree", "MemAvailable", "Buffers", "Cached"):
                    meminfo[key] = int(rest.split()[0])
        with open("/proc/loadavg") as fh:
            fields = fh.read().split()
        running, _, total = fields[3].partition("/")
        self.send(
            {
                "id": req_id,
                "kind": "result",
                "agent_version": AGENT_VERSION,
                "protocol": PROTOCOL_VERSION,
                "uptime_s": _uptime(),
                "load": [float(x) for x in fields[:3]],
                "processes": {"running": int(running), "total": int(total)},
                "memory_kib": {
                    "total": meminfo.get("MemTotal"),
                    "free": meminfo.get("MemFree"),
                    "available": meminfo.get("MemAvailable"),
                    "buffers": meminfo.get("Buffers"),
                    "cached": meminfo.get("Cached"),
                },
                "time": time.time(),
                "hostname": os.uname().nodename,
            }
        )

    def op_configure(self, req_id: object, req: dict, _payload: bytes) -> None:
        plan = _configure_plan(req)
        self._claim(req_id, True)
        self._spawn(req_id, self._configure, req_id, plan)

    def _configure(self, req_id: object, plan: list[tuple]) -> None:
        applied: list[str] = []
        extra: dict = {}
        renamed = False
        if self.options.apply_configure:
            for step in plan:
                if step[0] == "network":
                    done = _apply_network(step[1])
                    applied += done.pop("applied")
                    extra["network"] = done
                else:
                    renamed |= _apply_step(step)
                    applied += _describe(step)
        self.send(
            {
                "id": req_id,
                "kind": "result",
                "applied": applied,
                "planned": [line for s in plan for line in _describe(s)],
                "dry_run": not self.options.apply_configure,
                **extra,
            }
        )
        if renamed:
            # Not on the host's time: a warm pool's hand-out sends its first command right after
            # this answer, and a new login shell takes the guest's one vCPU for tens of ms
            # under TCG. So after the host has gone quiet (``CONSOLE_RESTART_QUIET_S``).
            self._restart_console_when_quiet()

    def _restart_console_when_quiet(self) -> None:
        """``_restart_console`` once no request has run and none came for
        ``CONSOLE_RESTART_QUIET_S`` (at the latest after ``CONSOLE_RESTART_MAX_WAIT_S``), on a
        thread of its own."""

        def wait_then_restart() -> None:
            deadline = time.monotonic() + CONSOLE_RESTART_MAX_WAIT_S
            while time.monotonic() < deadline:
                time.sleep(CONSOLE_RESTART_QUIET_S / 2)
                with self.alock:
                    busy = bool(self.active)
                if not busy and time.monotonic() - self.last_input >= CONSOLE_RESTART_QUIET_S:
                    break
            _restart_console()

        threading.Thread(target=wait_then_restart, daemon=True).start()

    def op_network(self, req_id: object, req: dict, _payload: bytes) -> None:
        fields = {k: v for k, v in req.items() if k not in ("op", "id", "auth")}
        plan = _network_plan(fields)
        self._claim(req_id, True)
        self._spawn(req_id, self._network, req_id, plan)

    def _network(self, req_id: object, plan: dict) -> None:
        result: dict = {"interface": plan["interface"], "mac": plan["mac"], "applied": []}
        if self.options.apply_configure:
            result = _apply_network(plan)
        self.send(
            {
                "id": req_id,
                "kind": "result",
                **result,
                "planned": _network_describe(plan),
                "dry_run": not self.options.apply_configure,
            }
        )

    def op_shutdown(self, req_id: object, req: dict, _payload: bytes) -> None:
        action = req.get("action", "poweroff")
        if action not in ("poweroff", "reboot"):
            raise RequestError("bad_request", "action must be poweroff or reboot")
        self.send({"id": req_id, "kind": "result", "action": action})
        threading.Thread(target=_shutdown, args=(action, self.options), daemon=True).start()


def _common_protocol(req: dict) -> list[int]:
    wanted = req.get("protocol", [PROTOCOL_VERSION])
    if isinstance(wanted, int):
        wanted = [wanted]
    common = [v for v in SUPPORTED_PROTOCOLS if isinstance(wanted, list) and v in wanted]
    if not common:
        raise RequestError(
            "unsupported_version", f"agent speaks protocol {list(SUPPORTED_PROTOCOLS)}"
        )
    return common


def _uptime() -> float | None:
    try:
        with open("/proc/uptime") as fh:
            return float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _configure_plan(req: dict) -> list[tuple]:
    """Validate a configure request into steps; nothing is changed until all of it is valid."""
    import re

    plan: list[tuple] = []
    when = _number(req, "time")
    if when is not None:
        plan.append(("time", when))
    hostname = req.get("hostname")
    if hostname is not None:
        if not isinstance(hostname, str) or not re.fullmatch(
            r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9][A-Za-z0-9-]{0,62})*", hostname
        ):
            raise RequestError("bad_request", "hostname is not a valid host name")
        plan.append(("hostname", hostname))
    net = req.get("network")
    if net is not None:
        if not isinstance(net, dict):
            raise RequestError("bad_request", "network must be an object")
        plan.append(("network", _network_plan(net, default_interface="eth0")))
    entropy = req.get("entropy")
    if entropy is not None:
        import base64
        import binascii

        try:
            seed = base64.b64decode(entropy, validate=True) if isinstance(entropy, str) else b""
        except (binascii.Error, ValueError):
            seed = b""
        if not 16 <= len(seed) <= 512:
            raise RequestError("bad_request", "entropy must be 16 to 512 bytes in base64")
        # First: a guest restored from a shared saved state draws nothing before it is reseeded.
        plan.insert(0, ("entropy", seed))
    if not plan:
        raise RequestError("bad_request", "nothing to configure")
    return plan


def _describe(step: tuple) -> list[str]:
    if step[0] == "network":
        return _network_describe(step[1])
    if step[0] == "entropy":  # never the bytes
        return [f"entropy {len(step[1])} bytes, crng reseeded"]
    return [" ".join(str(x) for x in step)]


def _network_plan(net: dict, default_interface: str | None = None) -> dict:
    """Validate a network request: which interface (``match_mac``: the one that has this MAC
    now, or ``interface`` by name), then an optional new ``mac``, ``address`` (CIDR; replaces the
    interface's addresses of that family), ``gateway`` (the default route), ``dns`` (the
    resolvers) and ``up`` (default true). Nothing is changed here."""
    import ipaddress
    import re

    known = {"interface", "match_mac", "mac", "address", "gateway", "dns", "up"}
    unknown = sorted(set(net) - known)
    if unknown:
        raise RequestError("bad_request", f"unknown network field(s): {', '.join(unknown)}")
    mac_re = r"([0-9a-f]{2}:){5}[0-9a-f]{2}"

    def mac_field(field: str) -> str | None:
        value = net.get(field)
        if value is None:
            return None
        if not isinstance(value, str) or not re.fullmatch(mac_re, value, re.I):
            raise RequestError("bad_request", f"{field} must look like 52:54:00:12:34:56")
        if int(value[:2], 16) & 1:
            raise RequestError("bad_request", f"{field} {value} is a multicast address")
        return value.lower()

    plan: dict = {"match_mac": mac_field("match_mac"), "mac": mac_field("mac")}
    dev = net.get("interface", default_interface if plan["match_mac"] is None else None)
    if dev is not None and (
        not isinstance(dev, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", dev)
    ):
        raise RequestError("bad_request", "interface is not a valid interface name")
    if dev is None and plan["match_mac"] is None:
        raise RequestError("bad_request", "give match_mac or interface")
    plan["interface"] = dev
    address = net.get("address")
    if address is not None:
        try:
            iface = ipaddress.ip_interface(address)
        except (TypeError, ValueError) as exc:
            raise RequestError("bad_request", f"address: {exc}") from exc
        plan["address"] = iface
    gateway = net.get("gateway")
    if gateway is not None:
        try:
            gw = ipaddress.ip_address(gateway)
        except (TypeError, ValueError) as exc:
            raise RequestError("bad_request", f"gateway: {exc}") from exc
        if "address" in plan and gw.version != plan["address"].version:
            raise RequestError("bad_request", "gateway and address are of different families")
        plan["gateway"] = gw
    dns = net.get("dns")
    if dns is not None:
        try:
            plan["dns"] = [str(ipaddress.ip_address(x)) for x in _str_list(dns, "dns")]
        except ValueError as exc:
            raise RequestError("bad_request", f"dns: {exc}") from exc
    up = net.get("up", True)
    if not isinstance(up, bool):
        raise RequestError("bad_request", "up must be true or false")
    plan["up"] = up
    return plan


def _network_describe(plan: dict, dev: str | None = None) -> list[str]:
    dev = dev or plan["interface"] or f"<{plan['match_mac']}>"
    out = []
    if plan["mac"]:
        out.append(f"ip link set dev {dev} address {plan['mac']}")
    out.append(f"ip link set dev {dev} {'up' if plan['up'] else 'down'}")
    if plan.get("address") is not None:
        out.append(f"ip addr replace {plan['address'].with_prefixlen} dev {dev}")
    if plan.get("gateway") is not None:
        out.append(f"ip route replace default via {plan['gateway']} dev {dev}")
    if plan.get("dns") is not None:
        out.append(f"resolv.conf nameserver {' '.join(plan['dns'])}")
    return out


class Rtnl:
    """Just enough rtnetlink (stdlib sockets and struct) to configure one interface.

    ``ip`` (busybox) would do the same, but each fork and exec costs tens of milliseconds under
    TCG, and a VM restored from a template waits for this before it is on its network.
    """

    GETLINK, NEWLINK, NEWADDR, DELADDR, GETADDR, NEWROUTE = 18, 16, 20, 21, 22, 24
    F_REQUEST, F_ACK, F_DUMP, F_REPLACE, F_CREATE = 0x1, 0x4, 0x300, 0x100, 0x400
    ERROR, DONE = 2, 3
    IFF_UP = 0x1

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
        self.sock.bind((0, 0))
        self.sock.settimeout(5.0)
        self.seq = int(time.time()) & 0xFFFF

    def close(self) -> None:
        self.sock.close()

    @staticmethod
    def _attr(kind: int, value: bytes) -> bytes:
        import struct

        raw = struct.pack("=HH", 4 + len(value), kind) + value
        return raw + b"\0" * (-len(raw) % 4)

    @staticmethod
    def attrs(data: bytes) -> dict:
        import struct

        out, off = {}, 0
        while off + 4 <= len(data):
            length, kind = struct.unpack_from("=HH", data, off)
            if length < 4:
                break
            out[kind & 0x3FFF] = data[off + 4 : off + length]
            off += (length + 3) & ~3
        return out

    def request(self, mtype: int, flags: int, body: bytes, attrs: tuple = ()) -> list:
        import struct

        self.seq += 1
        payload = body + b"".join(self._attr(k, v) for k, v in attrs)
        head = struct.pack("=LHHLL", 16 + len(payload), mtype, flags | self.F_REQUEST, self.seq, 0)
        self.sock.send(head + payload)
        out = []
        while True:
            data = self.sock.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, kind, _flags, seq, _pid = struct.unpack_from("=LHHLL", data, off)
                if length < 16:
                    raise RequestError("configure_failed", "malformed netlink answer")
                if seq == self.seq:
                    if kind == self.ERROR:
                        err = struct.unpack_from("=i", data, off + 16)[0]
                        if err:
                            raise OSError(-err, os.strerror(-err))
                        return out
                    if kind == self.DONE:
                        return out
                    out.append(data[off + 16 : off + length])
                off += (length + 3) & ~3

    def links(self) -> list[tuple[int, str, str, int]]:
        """(index, name, mac, flags) of every interface."""
        import struct

        out = []
        for msg in self.request(self.GETLINK, self.F_DUMP, struct.pack("=BxHiII", 0, 0, 0, 0, 0)):
            _fam, _type, index, flags, _change = struct.unpack_from("=BxHiII", msg)
            attrs = self.attrs(msg[16:])
            name = attrs.get(3, b"").rstrip(b"\0").decode()
            mac = ":".join(f"{b:02x}" for b in attrs.get(1, b""))
            out.append((index, name, mac, flags))
        return out

    def set_link(self, index: int, *, mac: str | None = None, up: bool | None = None) -> None:
        import struct

        flags = self.IFF_UP if up else 0
        change = self.IFF_UP if up is not None else 0
        attrs = ((1, bytes.fromhex(mac.replace(":", ""))),) if mac else ()
        body = struct.pack("=BxHiII", 0, 0, index, flags, change)
        self.request(self.NEWLINK, self.F_ACK, body, attrs)

    def addresses(self, index: int, family: int) -> list[tuple[bytes, int]]:
        import struct

        out = []
        body = struct.pack("=BBBBI", family, 0, 0, 0, 0)
        for msg in self.request(self.GETADDR, self.F_DUMP, body):
            fam, prefix, _flags, _scope, ifindex = struct.unpack_from("=BBBBI", msg)
            attrs = self.attrs(msg[8:])
            addr = attrs.get(2) or attrs.get(1)  # IFA_LOCAL, else IFA_ADDRESS
            if fam == family and ifindex == index and addr:
                out.append((addr, prefix))
        return out

    def replace_address(self, index: int, iface) -> None:  # noqa: ANN001 - ipaddress, lazily
        import socket
        import struct

        family = socket.AF_INET if iface.version == 4 else socket.AF_INET6
        new = iface.ip.packed
        for addr, prefix in self.addresses(index, family):
            if family == socket.AF_INET6 and addr[:2] == b"\xfe\x80":
                continue  # the kernel's link-local address: it follows the MAC
            if addr == new and prefix == iface.network.prefixlen:
                continue
            body = struct.pack("=BBBBI", family, prefix, 0, 0, index)
            self.request(self.DELADDR, self.F_ACK, body, ((2, addr), (1, addr)))
        attrs = [(2, new), (1, new)]
        if iface.version == 4 and iface.network.prefixlen < 31:
            attrs.append((4, iface.network.broadcast_address.packed))  # IFA_BROADCAST
        body = struct.pack("=BBBBI", family, iface.network.prefixlen, 0, 0, index)
        self.request(self.NEWADDR, self.F_ACK | self.F_CREATE | self.F_REPLACE, body, tuple(attrs))

    def replace_default_route(self, index: int, gateway) -> None:  # noqa: ANN001
        import socket
        import struct

        family = socket.AF_INET if gateway.version == 4 else socket.AF_INET6
        # main table, RTPROT_BOOT, universe scope, unicast
        body = struct.pack("=BBBBBBBBI", family, 0, 0, 0, 254, 3, 0, 1, 0)
        attrs = ((5, gateway.packed), (4, struct.pack("=i", index)))  # RTA_GATEWAY, RTA_OIF
        self.request(self.NEWROUTE, self.F_ACK | self.F_CREATE | self.F_REPLACE, body, attrs)


def _apply_network(plan: dict) -> dict:
    """Carry out a network plan; returns the interface, its MAC and what was done."""
    import errno

    rtnl = Rtnl()
    try:
        links = rtnl.links()
        if plan["match_mac"] is not None:
            found = [link for link in links if link[2] == plan["match_mac"]]
            if plan["interface"] is not None:
                found = [link for link in found if link[1] == plan["interface"]]
            what = f"with MAC {plan['match_mac']}"
        else:
            found = [link for link in links if link[1] == plan["interface"]]
            what = f"named {plan['interface']}"
        if len(found) != 1:
            raise RequestError(
                "not_found" if not found else "ambiguous", f"{len(found)} interfaces {what}"
            )
        index, dev, mac, flags = found[0]
        try:
            if plan["mac"] and plan["mac"] != mac:
                try:
                    rtnl.set_link(index, mac=plan["mac"])
                except OSError as exc:
                    if exc.errno != errno.EBUSY or not flags & Rtnl.IFF_UP:
                        raise
                    # No live MAC change on this device: down, change, (up below).
                    rtnl.set_link(index, up=False)
                    rtnl.set_link(index, mac=plan["mac"])
                mac = plan["mac"]
            # Up before addresses: the kernel adds the prefix route of an address only on an
            # interface that is up, and the gateway must be reachable through it.
            rtnl.set_link(index, up=plan["up"])
            if plan.get("address") is not None:
                rtnl.replace_address(index, plan["address"])
            if plan.get("gateway") is not None:
                rtnl.replace_default_route(index, plan["gateway"])
        except OSError as exc:
            raise RequestError("configure_failed", f"{dev}: {exc.strerror or exc}") from exc
        if plan.get("dns") is not None:
            with open("/etc/resolv.conf", "w") as fh:
                fh.write("".join(f"nameserver {s}\n" for s in plan["dns"]))
        return {"interface": dev, "mac": mac, "applied": _network_describe(plan, dev)}
    finally:
        rtnl.close()


def _apply_step(step: tuple) -> bool:
    """Apply one configure step; True when the host name changed (the console's login shell
    is then restarted, after the answer: ``_restart_console``)."""
    import socket

    kind = step[0]
    if kind == "entropy":
        _reseed(step[1])
        return False
    if kind == "time":
        time.clock_settime(time.CLOCK_REALTIME, step[1])
    elif kind == "hostname":
        renamed = socket.gethostname() != step[1]
        socket.sethostname(step[1])
        # /etc/hostname and /etc/hosts are links into /run in the guest (read-only root).
        for path, text in (
            ("/etc/hostname", f"{step[1]}\n"),
            ("/etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{step[1]}\n::1\tlocalhost\n"),
        ):
            try:
                with open(path, "w") as fh:
                    fh.write(text)
            except OSError as exc:
                log(f"configure: cannot write {path}: {exc}")
        return renamed
    else:
        raise RequestError("internal", f"unknown configure step {kind!r}")
    return False


# _IO('R', 0x07): the kernel's CRNG reseeds from its input pool now (CAP_SYS_ADMIN).
RNDRESEEDCRNG = 0x5207


def _reseed(seed: bytes) -> None:
    """Mix the host's ``seed`` into the kernel's input pool (a write to /dev/urandom) and reseed
    the CRNG from it, so guests restored from one saved state stop sharing random numbers."""
    import fcntl

    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, seed)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def _restart_console(tty: str = "/dev/ttyS0") -> None:
    """Hang up the serial console's session so init starts a fresh login shell there: its
    prompt names the new host (bash reads the host name once, at start), and it is printed at
    once, so whoever opens the console of a restored guest sees a prompt without pressing Enter.
    """
    import signal

    try:
        rdev = os.stat(tty).st_rdev
    except OSError:
        return
    major, minor = os.major(rdev), os.minor(rdev)
    tty_nr = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)  # as /proc/PID/stat has it
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # After the name: state, ppid, pgrp, session, tty_nr.
        if int(fields[4]) == tty_nr and int(fields[3]) == int(pid):  # the session's leader
            try:
                os.kill(int(pid), signal.SIGHUP)
            except OSError:
                pass


def _shutdown(action: str, options: Options) -> None:
    import signal

    time.sleep(0.2)  # let the reply leave before the transport goes away
    if not options.system_shutdown:
        log(f"shutdown ({action}) requested: exiting (not the system's init)")
        os._exit(0)
    os.sync()
    # busybox init: SIGUSR2 powers off, SIGTERM reboots, after running the shutdown actions.
    os.kill(1, signal.SIGUSR2 if action == "poweroff" else signal.SIGTERM)


# --------------------------------------------------------------------------- listeners


def find_virtio_port(name: str) -> str | None:
    base = "/sys/class/virtio-ports"
    try:
        ports = os.listdir(base)
    except OSError:
        return None
    for port in sorted(ports):
        try:
            with open(f"{base}/{port}/name") as fh:
                if fh.read().strip() == name:
                    return f"/dev/{port}"
        except OSError:
            continue
    return None


def serve_virtio_serial(name: str, options: Options) -> None:
    """Serve the named port forever; wait for it to appear (drivers may still be probing)."""
    waited = 0.0
    while True:
        path = find_virtio_port(name)
        if path and os.path.exists(path):
            try:
                Session(VirtioSerialTransport(path), options).serve()
            except OSError as exc:
                log(f"{path}: {exc}")
            time.sleep(1)
            continue
        if waited == 0.0 or waited > 30:
            log(f"waiting for virtio-serial port {name!r}")
            waited = 0.0
        time.sleep(0.5)
        waited += 0.5


def serve_listener(sock, name: str, options: Options) -> None:  # noqa: ANN001
    while True:
        try:
            conn, _ = sock.accept()
        except OSError as exc:
            log(f"{name}: accept failed: {exc}")
            time.sleep(0.5)
            continue
        session = Session(SocketTransport(conn, name), options)
        threading.Thread(target=session.serve, daemon=True).start()


def serve_vsock(port: int, options: Options) -> None:
    import socket

    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.bind((socket.VMADDR_CID_ANY, port))
        sock.listen(16)
    except (OSError, AttributeError) as exc:
        log(f"no AF_VSOCK listener ({exc}); virtio-serial only")
        return
    serve_listener(sock, f"vsock:{port}", options)


def serve_unix(path: str, options: Options) -> None:
    import socket

    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    serve_listener(sock, f"unix:{path}", options)


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="MicroVM Sandbox guest agent")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--guest", action="store_true", help="serve virtio-serial and vsock")
    mode.add_argument("--listen-unix", metavar="PATH", help="serve a unix socket (tests)")
    mode.add_argument("--stdio", action="store_true", help="serve stdin/stdout (tests)")
    parser.add_argument("--port-name", default=PORT_NAME)
    parser.add_argument("--vsock-port", type=int, default=VSOCK_PORT)
    parser.add_argument(
        "--credential-file",
        metavar="PATH",
        help=f"keep the credential's SHA-256 here (--guest: {CREDENTIAL_FILE}; else in memory)",
    )
    parser.add_argument(
        "--apply-configure",
        action="store_true",
        help="really change clock, hostname and network (implied by --guest)",
    )
    args = parser.parse_args(argv)
    options = Options(
        apply_configure=args.guest or args.apply_configure,
        system_shutdown=args.guest,
        credential=Credential(args.credential_file or (CREDENTIAL_FILE if args.guest else None)),
    )
    log(f"agent {AGENT_VERSION} protocol {PROTOCOL_VERSION} pid {os.getpid()}")
    if args.stdio:
        Session(FdTransport(0, 1, "stdio"), options).serve()
        return 0
    if args.listen_unix:
        serve_unix(args.listen_unix, options)
        return 0
    if args.vsock_port:
        threading.Thread(target=serve_vsock, args=(args.vsock_port, options), daemon=True).start()
    serve_virtio_serial(args.port_name, options)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
