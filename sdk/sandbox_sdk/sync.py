"""The synchronous SDK: ``Client`` (HTTP with httpx, streams with websockets) and ``Sandbox``.

Every operation is one of ``sandbox_sdk._core``'s generators; this module only carries out the
calls they yield."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect
from websockets.typing import Origin

from sandbox_sdk import _core
from sandbox_sdk._base import Snapshot, VMView, snapshot_id, tls_context
from sandbox_sdk._core import API, CHUNK, Call, Chunk, Config, ExecResult, ExecStatus, Reply, Sleep
from sandbox_sdk.errors import NotFound, SandboxError, Unavailable, error_from


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            yield block


def _body_of(call: Call) -> tuple[Any, dict[str, str]]:
    if call.upload is None:
        return None, {}
    headers = {"Content-Type": "application/octet-stream"}
    if isinstance(call.upload, Path):
        headers["Content-Length"] = str(call.upload.stat().st_size)
        return _file_chunks(call.upload), headers
    return call.upload, headers


class Client:
    """A connection to one server with one token (``Config.resolve``: arguments, then
    ``SANDBOX_URL`` / ``SANDBOX_TOKEN``, then the ``sandbox login`` file)."""

    def __init__(
        self, url: str | None = None, token: str | None = None, *, timeout: float = 60.0
    ) -> None:
        base = Config.resolve(url, token)
        self.config = Config(base.url, base.token, timeout)
        self.http = httpx.Client(
            base_url=self.config.url + API,
            headers=self.config.headers,
            timeout=timeout,
            verify=tls_context(),
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- running the core's operations ---

    def run(self, op: _core.Op) -> Any:
        try:
            step = next(op)
            while True:
                if isinstance(step, Sleep):
                    time.sleep(step.seconds)
                    step = op.send(None)
                else:
                    step = op.send(self.send(step))
        except StopIteration as done:
            return done.value

    def send(self, call: Call) -> Reply:
        attempt = 0
        while True:
            try:
                reply = self._once(call)
            except httpx.TransportError as exc:
                if not call.idempotent or attempt >= _core.RETRIES:
                    raise Unavailable(f"cannot reach {self.config.url}: {exc}") from exc
            else:
                if reply.status != 503 or not call.idempotent or attempt >= _core.RETRIES:
                    return reply
            attempt += 1
            time.sleep(_core.backoff(attempt))

    def _once(self, call: Call) -> Reply:
        content, headers = _body_of(call)
        timeout = self.config.timeout + (call.wait_s or 0)
        request = self.http.build_request(
            call.method,
            call.path,
            params=call.params,
            json=call.json,
            content=content,
            headers=headers,
            timeout=timeout,
        )
        response = self.http.send(request, stream=True)
        try:
            if call.download is not None and response.status_code in call.ok:
                digest = hashlib.sha256()
                size = 0
                with call.download.open("wb") as fh:
                    for block in response.iter_bytes(CHUNK):
                        digest.update(block)
                        size += len(block)
                        fh.write(block)
                return Reply(
                    response.status_code, dict(response.headers), b"", digest.hexdigest(), size
                )
            if call.limit is not None and response.status_code in call.ok:
                kept = bytearray()  # enough to know it is over the limit, and no more
                for block in response.iter_bytes(CHUNK):
                    kept.extend(block)
                    if len(kept) > call.limit:
                        break
                size = _core.announced_size(response.headers, len(kept))
                return Reply(response.status_code, dict(response.headers), bytes(kept), None, size)
            body = response.read()
        finally:
            response.close()
        return Reply(response.status_code, dict(response.headers), body, None, len(body))

    # --- streams ---

    def exec_stream(
        self,
        vm_id: str,
        argv: Iterable[str] | str,
        *,
        stdin: str | bytes | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> ExecStream:
        body = _core.exec_body(argv, stdin, env, cwd, timeout)
        return ExecStream(self, vm_id, body)


class ExecStream:
    """Iterate for ``Chunk``s as the guest writes them; then ``exit_code`` (and ``status``)."""

    def __init__(self, client: Client, vm_id: str, body: dict[str, Any]) -> None:
        self.client, self.vm_id, self.body = client, vm_id, body
        self.status: ExecStatus | None = None

    @property
    def exit_code(self) -> int | None:
        if self.status is None:
            raise SandboxError("the stream has not ended yet")
        return self.status.exit_code

    def __iter__(self) -> Iterator[Chunk]:
        config = self.client.config
        try:
            with ws_connect(
                config.ws_url(_core.exec_ws_path(self.vm_id)),
                additional_headers=config.headers,
                origin=Origin(config.url),
                open_timeout=config.timeout,
                max_size=None,
            ) as ws:
                ws.send(json.dumps(self.body))
                while True:
                    try:
                        frame = ws.recv()
                    except ConnectionClosed as exc:
                        raise _core.closed_error(exc.rcvd.code if exc.rcvd else None) from exc
                    item = _core.parse_frame(frame)
                    if isinstance(item, ExecStatus):
                        self.status = item
                        return
                    yield item
        except InvalidStatus as exc:
            raise error_from(exc.response.status_code, {"detail": "websocket refused"}) from exc
        except OSError as exc:
            raise Unavailable(f"cannot reach {config.url}: {exc}") from exc

    def collect(self) -> ExecResult:
        out, err = bytearray(), bytearray()
        for chunk in self:
            (out if chunk.stream == "stdout" else err).extend(chunk.data)
        assert self.status is not None
        return ExecResult(
            exit_code=self.status.exit_code,
            stdout=out.decode(errors="replace"),
            stderr=err.decode(errors="replace"),
            stdout_bytes=bytes(out),
            stderr_bytes=bytes(err),
            signal=self.status.signal,
            timed_out=self.status.timed_out,
            duration_s=self.status.duration_s,
            stdout_size=len(out),
            stderr_size=len(err),
        )


class Console:
    """A VM's serial console over its websocket: ``send`` keystrokes (bytes); ``recv`` (or
    iterate) for terminal output (bytes) and status messages (dicts: ``session`` with the
    ``mode``, ``link`` when the console relay comes or goes). Use it as a context manager.
    A read-only caller (a viewer, a read-only token) watches: its input is dropped."""

    def __init__(self, client: Client, vm_id: str, cols: int = 80, rows: int = 24) -> None:
        self.client, self.vm_id, self.cols, self.rows = client, vm_id, cols, rows
        self.ws: Any = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Console:
        config = self.client.config
        try:
            self.ws = self._stack.enter_context(
                ws_connect(
                    config.ws_url(_core.console_ws_path(self.vm_id, self.cols, self.rows)),
                    additional_headers=config.headers,
                    origin=Origin(config.url),
                    open_timeout=config.timeout,
                    max_size=None,
                )
            )
        except InvalidStatus as exc:
            raise error_from(exc.response.status_code, {"detail": "console refused"}) from exc
        except OSError as exc:
            raise Unavailable(f"cannot reach {config.url}: {exc}") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def send(self, data: bytes | str) -> None:
        self.ws.send(data.encode() if isinstance(data, str) else data)

    def recv(self, timeout: float | None = None) -> bytes | dict[str, Any]:
        """The next frame; ``TimeoutError`` after ``timeout`` s, ``SandboxError`` once closed."""
        try:
            return _core.parse_console_frame(self.ws.recv(timeout))
        except ConnectionClosed as exc:
            raise _core.closed_error(exc.rcvd.code if exc.rcvd else None) from exc

    def __iter__(self) -> Iterator[bytes | dict[str, Any]]:
        while True:
            try:
                frame = self.ws.recv()
            except ConnectionClosed:
                return
            yield _core.parse_console_frame(frame)


class Files:
    """Files in a sandbox's guest, SHA-256 checked both ways."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    def write(self, path: str, data: bytes | str) -> dict[str, Any]:
        raw = data.encode() if isinstance(data, str) else data
        digest = hashlib.sha256(raw).hexdigest()
        return self.sandbox.client.run(_core.upload(self.sandbox.id, path, raw, digest))

    def read(self, path: str, *, limit: int | None = None) -> bytes:
        """The file's bytes; with ``limit``, a larger file is ``TooLarge`` (not read whole)."""
        return self.sandbox.client.run(_core.download(self.sandbox.id, path, None, limit))

    def upload(self, local: str | Path, path: str) -> dict[str, Any]:
        local = Path(local)
        digest = hashlib.sha256()
        with local.open("rb") as fh:
            while block := fh.read(CHUNK):
                digest.update(block)
        op = _core.upload(self.sandbox.id, path, local, digest.hexdigest())
        return self.sandbox.client.run(op)

    def download(self, path: str, local: str | Path) -> Path:
        local = Path(local)
        self.sandbox.client.run(_core.download(self.sandbox.id, path, local))
        return local


class Sandbox(VMView):
    """One VM. As a context manager it is destroyed on exit unless ``keep`` is true."""

    def __init__(self, client: Client, info: dict[str, Any], *, keep: bool = False) -> None:
        self.client, self.info, self.keep = client, info, keep
        self.owns_client = False  # made for this sandbox alone: closed on exit of its block
        self.files = Files(self)

    # --- finding and making ---

    @classmethod
    def create(
        cls,
        template: str = "linux-default",
        name: str | None = None,
        timeout: float | None = None,
        *,
        keep: bool = False,
        start: bool = True,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        disk_mib: int | None = None,
        network: str | None = None,
        budget: str | None = None,
        lifetime_s: int | None = None,
        client: Client | None = None,
        url: str | None = None,
        token: str | None = None,
    ) -> Sandbox:
        """Create a VM and wait (at most ``timeout`` s) until it runs (or exists, unstarted).
        ``lifetime_s``: the server stops or destroys it (as its template says) that many seconds
        after its creation (0: never; None: its template's lifetime)."""
        owned = client is None
        client = client or Client(url, token)
        op = _core.create_vm(
            name=name,
            template=template,
            start=start,
            vcpus=vcpus,
            memory_mib=memory_mib,
            disk_mib=disk_mib,
            network=network,
            budget=budget,
            lifetime_s=lifetime_s,
            timeout=timeout,
        )
        made = cls(client, client.run(op), keep=keep)
        made.owns_client = owned
        return made

    @classmethod
    def connect(
        cls,
        vm_id: str,
        *,
        client: Client | None = None,
        url: str | None = None,
        token: str | None = None,
    ) -> Sandbox:
        """An existing VM; kept on exit of a ``with`` block (it was not made here)."""
        owned = client is None
        client = client or Client(url, token)
        made = cls(client, client.run(_core.get_vm(vm_id)), keep=True)
        made.owns_client = owned
        return made

    @classmethod
    def list(
        cls,
        *,
        state: str | None = None,
        name: str | None = None,
        client: Client | None = None,
        url: str | None = None,
        token: str | None = None,
    ) -> builtins.list[Sandbox]:
        client = client or Client(url, token)
        rows = client.run(_core.list_vms(state=state, name=name))
        return [cls(client, row, keep=True) for row in rows]

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self.keep:
                try:
                    self.destroy()
                except NotFound:
                    pass
        finally:
            if self.owns_client:
                self.client.close()

    def refresh(self) -> Sandbox:
        self.info = self.client.run(_core.get_vm(self.id))
        return self

    # --- the lifecycle ---

    def _act(
        self, verb: str, body: dict[str, Any] | None, wait: bool, timeout: float | None
    ) -> Any:
        answer = self.client.run(_core.vm_action(self.id, verb, body, wait, timeout))
        self.info = answer["vm"]
        return answer

    def start(self, *, wait: bool = True, timeout: float | None = None) -> Sandbox:
        self._act("start", None, wait, timeout)
        return self

    def stop(
        self,
        *,
        force: bool = False,
        grace_s: int | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> Sandbox:
        body: dict[str, Any] = {"force": force}
        if grace_s is not None:
            body["grace_s"] = grace_s
        self._act("stop", body, wait, timeout)
        return self

    def pause(self, *, wait: bool = True, timeout: float | None = None) -> Sandbox:
        self._act("pause", None, wait, timeout)
        return self

    def resume(self, *, wait: bool = True, timeout: float | None = None) -> Sandbox:
        self._act("resume", None, wait, timeout)
        return self

    def reboot(self, *, wait: bool = True, timeout: float | None = None) -> Sandbox:
        self._act("reboot", None, wait, timeout)
        return self

    def resize(
        self,
        *,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> Sandbox:
        body = {k: v for k, v in (("vcpus", vcpus), ("memory_mib", memory_mib)) if v is not None}
        self._act("resize", body, wait, timeout)
        return self

    def snapshot(
        self, name: str | None = None, *, wait: bool = True, timeout: float | None = None
    ) -> Snapshot:
        answer = self._act("snapshot", {"name": name} if name else {}, wait, timeout)
        return Snapshot.of(self.client.run(_core.get_snapshot(answer["snapshot"]["id"])))

    def snapshots(self) -> builtins.list[Snapshot]:
        return [Snapshot.of(s) for s in self.client.run(_core.list_snapshots(self.id))]

    def restore(
        self, snapshot: Snapshot | str, *, wait: bool = True, timeout: float | None = None
    ) -> Sandbox:
        answer = self.client.run(_core.restore(snapshot_id(snapshot), wait, timeout))
        self.info = answer["vm"]
        return self

    def clone(
        self,
        snapshot: Snapshot | str,
        name: str | None = None,
        *,
        keep: bool = False,
        wait: bool = True,
        timeout: float | None = None,
        lifetime_s: int | None = None,
    ) -> Sandbox:
        """A new VM from one of this VM's snapshots (destroyed on exit of its own ``with``)."""
        answer = self.client.run(
            _core.clone(snapshot_id(snapshot), name, wait, timeout, lifetime_s)
        )
        return Sandbox(self.client, answer["vm"], keep=keep)

    def destroy(self, *, wait: bool = True, timeout: float | None = None) -> None:
        answer = self.client.run(_core.destroy_vm(self.id, wait, timeout))
        self.info = answer["vm"]

    def fork(
        self,
        count: int = 1,
        *,
        names: builtins.list[str] | None = None,
        keep: bool = False,
        wait: bool = True,
        timeout: float | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> builtins.list[Sandbox]:
        """``count`` new VMs from this VM's running state of now (its memory and disk: one
        snapshot, restored once per new VM, each with its own identity); each is destroyed on
        exit of its own ``with`` unless ``keep``. Waits (``timeout``) until all N settled, then
        each runs (``RequestFailed`` names a failed one); ``progress`` is called with each read
        of the fork's status (``count``, ``running``, ``failed``, ``pending``, ``settled``)."""
        made = self.client.run(_core.fork(self.id, count, names, wait, timeout, progress))
        return [Sandbox(self.client, info, keep=keep) for info in made]

    def set_idle(self, seconds: int | None, *, to_disk: bool = False) -> dict[str, Any]:
        """Pause this VM after ``seconds`` without exec, file transfer or console input (None:
        never); the next exec or file request resumes it. ``to_disk``: that pause suspends it
        to disk (its memory saved to a file and freed on the host). The server's answer."""
        return self.client.run(_core.set_idle(self.id, seconds, to_disk))

    def set_lifetime(self, seconds: int) -> dict[str, Any]:
        """End this VM's lifetime ``seconds`` from now (extend or shorten it; 0 clears it): the
        server then stops or destroys it, as its template says. The server's answer
        (``timeout_s``, ``expires_at``, ``on_expiry``)."""
        answer = self.client.run(_core.set_lifetime(self.id, seconds))
        self.info = {**self.info, "expires_at": answer["expires_at"]}
        return answer

    # --- guest access ---

    def exec(
        self,
        argv: Iterable[str] | str,
        *,
        stdin: str | bytes | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run a command (a string runs under ``sh -c``); its exit code and output."""
        body = _core.exec_body(argv, stdin, env, cwd, timeout)
        return self.client.run(_core.run_exec(self.id, body))

    def console(self, *, cols: int = 80, rows: int = 24) -> Console:
        """The serial console (a context manager): see ``Console``."""
        return Console(self.client, self.id, cols, rows)

    def exec_stream(
        self,
        argv: Iterable[str] | str,
        *,
        stdin: str | bytes | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> ExecStream:
        """The command's output as it comes (the exec websocket): iterate for chunks."""
        return self.client.exec_stream(
            self.id, argv, stdin=stdin, env=env, cwd=cwd, timeout=timeout
        )
