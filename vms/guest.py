"""Guest access from the web tier: exec and file transfer through the agent, each one audited.

Fail closed: each access appends its request (``vm.exec_requested``,
``vm.file_upload_requested``, ``vm.file_download_requested``) and commits it before the agent is
asked anything; when the log cannot take the request, nothing reaches the guest
(``EventStoreUnavailable``: 503). Then the outcome is appended with the request as its
causation: ``vm.exec_completed`` / ``vm.file_uploaded`` / ``vm.file_downloaded``, or the
matching ``*_failed`` with the reason when the agent timed out, refused or could not be reached.

A VMM's agent channel takes one client at a time (QEMU's chardev socket), so sessions to one VM
are serialized across processes on the host with a lock file in its runtime directory; a waiter
gives up after a deadline with a clear error.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from django.conf import settings
from django.core.exceptions import ValidationError

from accounts.caller import Caller
from audit import store
from audit.actor import Actor
from audit.errors import EventStoreUnavailable
from secretstore import guests
from secretstore.masking import NO_MASKER, Masker, MaskingWriter
from vms import commands, idle, lifecycle, runtime
from vms.agent import credentials
from vms.agent.client import AgentClient, AgentError, AgentTimeout
from vms.hypervisors.base import HypervisorError
from vms.models import VirtualMachine

log = logging.getLogger("sandbox.vms.guest")

AGENT_LOCK_WAIT_S = 30.0
EXEC_COMPLETED, EXEC_FAILED = lifecycle.guest_verb("exec").outcomes()
RECORDED_OUTPUT = 65536  # bytes of each stream in the event, with SANDBOX_EXEC_RECORD_OUTPUT


class GuestUnavailable(Exception):
    """The guest cannot be reached now (not running, agent not answering, channel busy)."""


class OutcomeNotRecorded(GuestUnavailable):
    """The guest acted (its request is in the log) but the log refused the outcome event."""

    def __init__(self, request: store.RecordedEvent, what: str, exc: Exception) -> None:
        super().__init__(
            f"{what} in the guest, but the audit log could not record its outcome ({exc}); "
            f"the request is event {request.event_id} at position {request.position}"
        )
        self.request = request


# A warm pool hand-out's agent connection (vms.pools), kept open a moment for the VM's first
# session in this process: the guest agent notices a new host connection only at its next poll
# of the port (every 100 ms while no host is connected), and a create is mostly followed at once
# by an exec. A session of another process waits (QEMU takes one client at a time) until the
# parked connection is closed, at most PARK_S later.
PARK_S = 0.5
_parked: dict[Any, AgentClient] = {}
_parked_lock = threading.Lock()


def park(vm_id: Any, client: AgentClient) -> None:
    """Keep ``client`` (greeted, presenting the VM's credential) for the VM's next session in
    this process, for at most ``PARK_S``; then it is closed."""
    with _parked_lock:
        previous = _parked.pop(vm_id, None)
        _parked[vm_id] = client
    if previous is not None:
        previous.close()
    timer = threading.Timer(PARK_S, _unpark, args=(vm_id, client))
    timer.daemon = True
    timer.start()


def _unpark(vm_id: Any, client: AgentClient) -> None:
    with _parked_lock:
        if _parked.get(vm_id) is not client:
            return  # taken by a session, which closes it
        del _parked[vm_id]
    client.close()


def _take_parked(vm_id: Any) -> AgentClient | None:
    with _parked_lock:
        return _parked.pop(vm_id, None)


@contextlib.contextmanager
def agent_session(vm: VirtualMachine, *, hello_timeout: float = 20.0) -> Iterator[Any]:
    rt = runtime.runtime_dir(vm.pk)
    if not rt.root.is_dir():
        raise GuestUnavailable("the guest cannot be reached: this host has no VMM for the VM")
    lock_path = rt.root / "agent.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + AGENT_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise GuestUnavailable("the guest agent is busy with another session") from None
                time.sleep(0.05)
        # A parked connection was greeted by the hand-out a moment ago (and its rotate gave it
        # the VM's credential): no second hello round trip. Every request carries the
        # credential anyway; the hello only proves the agent answers.
        client = _take_parked(vm.pk)
        if client is None or not client.greeted:
            if client is not None:
                client.close()
            client = credentials.client_for_vm(vm)
            try:
                client.hello(timeout=hello_timeout)
            except (AgentError, HypervisorError, OSError) as exc:
                client.close()
                raise GuestUnavailable(f"the guest agent does not answer: {exc}") from exc
        try:
            yield client
        finally:
            client.close()
    finally:
        os.close(fd)


def rotate_agent_credential(vm: VirtualMachine, *, actor: Actor) -> None:
    """Give a running VM's agent a fresh credential now (an operator's request, e.g. after a
    suspected leak): the old one is refused from then on; ``vm.agent_credential_rotated``
    (reason ``requested``) records it. Waits for the VM's agent session like any other user of
    the channel, so no session is cut in the middle of a request."""
    with agent_session(vm) as agent:
        credentials.give_fresh(vm, agent, "requested", actor=actor)


# Who may reach a guest: the policy (vms.policy) and the state the lifecycle table allows,
# checked by the commands; re-exported for the views.
require_guest_access = commands.require_guest_access


def _woken(caller: Caller, vm: VirtualMachine, kind: str) -> VirtualMachine:
    """``vm`` resumed first if the system paused it for idleness (``vms.idle.wake``), and
    marked used."""
    try:
        return idle.wake(caller, vm, kind)
    except idle.WakeFailed as exc:
        raise GuestUnavailable(str(exc)) from exc


def _asked(
    caller: Caller, vm: VirtualMachine, kind: str, data: dict[str, Any]
) -> tuple[VirtualMachine, store.RecordedEvent]:
    """``vm`` woken if need be (``_woken``) and the guest request recorded. When the system's
    idle pause was asked between the wake's look and the request (the request finds the VM
    pausing), the wake waits for that pause and resumes it, and the request is asked again,
    once: resume stays transparent."""
    vm = _woken(caller, vm, kind)
    try:
        return vm, commands.request_guest_access(caller, vm, kind, data)
    except commands.InvalidState as exc:
        if not idle.idle_pause_pending(exc.vm):
            raise
        pausing = exc.vm
    vm = _woken(caller, pausing, kind)
    return vm, commands.request_guest_access(caller, vm, kind, data)


def _failure(exc: BaseException, started: float, masker: Masker = NO_MASKER) -> dict[str, Any]:
    code = exc.code if isinstance(exc, AgentError) else type(exc).__name__
    return {
        "reason": masker.mask_text(str(exc))[:2000],
        "code": code,
        "agent_timed_out": isinstance(exc, AgentTimeout),
        "wall_s": round(time.monotonic() - started, 4),
    }


def _record_failure(
    caller: Caller,
    request: store.RecordedEvent,
    outcome: str,
    exc: BaseException,
    started: float,
    extra: dict[str, Any] | None = None,
    masker: Masker = NO_MASKER,
) -> None:
    """Append the failure outcome of ``request``; if the log refuses that too, the request stays
    in the log without an outcome (what happened in the guest is then unknown, as it says)."""
    try:
        commands.record_guest_outcome(
            caller, request, outcome, {**(extra or {}), **_failure(exc, started, masker)}
        )
    except Exception:
        log.exception("%s of request %s not recorded", outcome, request.event_id)


@dataclass
class ExecOutcome:
    exit_code: int | None
    signal: int | None
    timed_out: bool
    duration_s: float
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    stdout_size: int  # what the process wrote, kept or not
    stderr_size: int
    event_position: int

    @property
    def truncated(self) -> bool:
        return self.stdout_truncated or self.stderr_truncated


class _Capture:
    """One output stream, masked for the guest's secrets first (``secretstore.masking``), then
    counted and hashed in full, its first ``limit`` bytes kept; ``finish`` releases what the
    masker held back (the end of the output that could have begun a value)."""

    def __init__(
        self, forward: Callable[[bytes], None] | None, limit: int, masker: Masker = NO_MASKER
    ) -> None:
        self.kept = bytearray()
        self.limit = limit
        self.size = 0
        self.digest = hashlib.sha256()
        self.forward = forward
        self.mask = masker.stream()

    def __call__(self, chunk: bytes) -> None:
        self._take(self.mask.feed(chunk))

    def finish(self) -> None:
        self._take(self.mask.flush())

    def _take(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.size += len(chunk)
        self.digest.update(chunk)
        room = self.limit - len(self.kept)
        if room > 0:
            self.kept += chunk[:room]
        if self.forward is not None:
            self.forward(chunk)


def run_exec(
    caller: Caller,
    vm: VirtualMachine,
    argv: list[str],
    *,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
    timeout: float = 60.0,
    on_stdout: Callable[[bytes], None] | None = None,
    on_stderr: Callable[[bytes], None] | None = None,
    keep: int | None = None,
    secrets: list[dict[str, str]] | None = None,
) -> ExecOutcome:
    """Record ``vm.exec_requested``, run ``argv`` in the guest, record ``vm.exec_completed``
    (argv, cwd, exit, duration, output sizes and SHA-256; the output itself only with
    SANDBOX_EXEC_RECORD_OUTPUT) or ``vm.exec_failed``.

    The outcome holds the first ``keep`` bytes of each stream (default
    SANDBOX_EXEC_OUTPUT_LIMIT) and the full sizes; the rest goes to ``on_stdout``/``on_stderr``
    (a stream) or nowhere, so a request's memory is bounded whatever the command prints.

    Secrets: the VM's own (``vm.secrets``, as variables) and those ``secrets`` names for this
    command (variables, or files written through the agent before it runs) reach the guest over
    the agent channel only; the events name them (name, owner, version, HMAC). Everything the
    command prints is masked for every secret the guest was ever given, before it is kept,
    hashed, recorded or forwarded, and so are the recorded argv.
    """
    require_guest_access(caller, vm, "exec")
    refs = guests.validate_refs(secrets)
    given = guests.resolve(caller.user, refs, caller=caller)
    own = [g for g in guests.resolve_records(vm.owner, vm.secrets) if g.env] if vm.secrets else []
    secret_env = {g.env: g.value.decode(errors="surrogateescape") for g in [*own, *given] if g.env}
    clash = sorted(set(secret_env) & set(env or {}))
    if clash:
        raise ValidationError({"env": f"{clash} are given by secrets too: give each one once"})
    masker = guests.masker_for_records(vm.secrets_seen, extra=[*own, *given])
    if not 0 < timeout <= settings.SANDBOX_EXEC_MAX_TIMEOUT_S:
        # The bound the reconciler relies on to settle an exec whose web process died.
        raise ValidationError(
            {"timeout": f"more than 0, at most {settings.SANDBOX_EXEC_MAX_TIMEOUT_S} seconds"}
        )
    limit = settings.SANDBOX_EXEC_OUTPUT_LIMIT if keep is None else keep
    if settings.SANDBOX_EXEC_RECORD_OUTPUT:
        limit = max(limit, RECORDED_OUTPUT)
    shown_argv = [masker.mask_text(a) for a in argv]
    asked: dict[str, Any] = {
        "argv": shown_argv,
        "cwd": cwd,
        "env_keys": sorted({*(env or {}), *secret_env}),  # values may hold secrets: names only
        "stdin_size": len(stdin or b""),
        "timeout": timeout,
    }
    if given:
        asked["secrets"] = [g.record() for g in given]
    vm, request = _asked(caller, vm, "exec", asked)
    out, err = _Capture(on_stdout, limit, masker), _Capture(on_stderr, limit, masker)
    started = time.monotonic()
    try:
        with agent_session(vm) as agent:
            for g in given:
                if g.file:
                    agent.put_file(io.BytesIO(g.value), g.file, mode=0o600, mkdirs=True)
            result = agent.exec(
                argv,
                cwd=cwd,
                env={**(env or {}), **secret_env} or None,
                stdin=stdin,
                timeout=timeout,
                on_stdout=out,
                on_stderr=err,
                wait_timeout=timeout + 30,
                keep=0,  # kept here, once
            )
    except Exception as exc:
        out.finish()
        err.finish()
        _record_failure(
            caller,
            request,
            EXEC_FAILED,
            exc,
            started,
            {"argv": shown_argv, "stdout_size": out.size, "stderr_size": err.size},
            masker,
        )
        raise
    out.finish()
    err.finish()
    details: dict[str, Any] = {
        "argv": shown_argv,
        "cwd": cwd,
        "env_keys": asked["env_keys"],
        "exit_code": result.exit_code,
        "signal": getattr(result, "signal", None),
        "timed_out": result.timed_out,
        "duration_s": round(result.duration_s, 4),
        "wall_s": round(time.monotonic() - started, 4),
        "stdin_size": asked["stdin_size"],
        "stdout_size": out.size,
        "stdout_sha256": out.digest.hexdigest(),
        "stderr_size": err.size,
        "stderr_sha256": err.digest.hexdigest(),
    }
    masked = sorted(out.mask.masked | err.mask.masked)
    if masked:
        details["masked_secrets"] = masked
    if settings.SANDBOX_EXEC_RECORD_OUTPUT:
        details["stdout"] = bytes(out.kept[:RECORDED_OUTPUT]).decode(errors="replace")
        details["stderr"] = bytes(err.kept[:RECORDED_OUTPUT]).decode(errors="replace")
    try:
        event = commands.record_guest_outcome(caller, request, EXEC_COMPLETED, details)
    except (EventStoreUnavailable, commands.AlreadySettled) as exc:
        raise OutcomeNotRecorded(request, "the command ran", exc) from exc
    wanted = settings.SANDBOX_EXEC_OUTPUT_LIMIT if keep is None else keep
    stdout, stderr = bytes(out.kept[:wanted]), bytes(err.kept[:wanted])
    return ExecOutcome(
        exit_code=result.exit_code,
        signal=details["signal"],
        timed_out=result.timed_out,
        duration_s=result.duration_s,
        stdout=stdout,
        stderr=stderr,
        stdout_truncated=out.size > len(stdout),
        stderr_truncated=err.size > len(stderr),
        stdout_size=out.size,
        stderr_size=err.size,
        event_position=event.position,
    )


def validate_guest_path(path: str) -> str:
    if not path or not path.startswith("/") or "\x00" in path or len(path) > 4096:
        raise ValidationError({"path": "an absolute path in the guest (at most 4096 characters)"})
    return path


def _transfer(
    caller: Caller,
    vm: VirtualMachine,
    kind: str,
    path: str,
    asked: dict[str, Any],
    move: Callable[[Any], Any],
    after: Callable[[Any], dict[str, Any]] | None = None,
) -> tuple[int, str]:
    """One file transfer, fail closed: request recorded, then the agent, then the outcome.
    ``after``: what to add to the outcome (and return instead of the guest's size and SHA-256:
    ``size`` and ``sha256`` of what was delivered)."""
    require_guest_access(caller, vm, kind)
    path = validate_guest_path(path)
    done, failed = lifecycle.guest_verb(kind).outcomes()
    vm, request = _asked(caller, vm, kind, {"path": path, **asked})
    started = time.monotonic()
    try:
        with agent_session(vm) as agent:
            transfer = move(agent)
    except Exception as exc:
        _record_failure(caller, request, failed, exc, started, {"path": path})
        raise
    data = {"path": path, "size": transfer.size, "sha256": transfer.sha256}
    delivered = after(transfer) if after is not None else {}
    data.update(delivered)
    try:
        commands.record_guest_outcome(caller, request, done, data)
    except (EventStoreUnavailable, commands.AlreadySettled) as exc:
        raise OutcomeNotRecorded(request, "the file was transferred", exc) from exc
    if "delivered_size" in delivered:
        return delivered["delivered_size"], delivered["delivered_sha256"]
    return transfer.size, transfer.sha256


class _Digesting:
    """A binary file object's ``write`` that also counts and hashes what it writes."""

    def __init__(self, dest: IO[bytes]) -> None:
        self.dest = dest
        self.size = 0
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.dest.write(data)
        self.size += len(data)
        self.digest.update(data)
        return len(data)


def upload(caller: Caller, vm: VirtualMachine, path: str, source: IO[bytes]) -> tuple[int, str]:
    """Upload ``source``, a binary stream (an uploaded file), to ``path`` in the guest. Never a
    name: a str or Path is refused (TypeError) before anything is recorded or sent."""
    if isinstance(source, str | bytes | os.PathLike) or not hasattr(source, "read"):
        raise TypeError("upload reads a binary stream, never a file name")
    size = getattr(source, "size", None)  # an uploaded file knows it; a stream may not
    return _transfer(
        caller,
        vm,
        "file_upload",
        path,
        {"size": size if isinstance(size, int) else None},
        lambda agent: agent.put_file(
            source, path, mkdirs=True, timeout=settings.SANDBOX_GUEST_TRANSFER_TIMEOUT_S
        ),
    )


def download(caller: Caller, vm: VirtualMachine, path: str, dest: IO[bytes]) -> tuple[int, str]:
    """Download ``path`` from the guest into ``dest``, a writable binary file object (never a
    name: TypeError before anything is recorded or asked).

    What is written is masked for every secret the guest was given (``[secret:NAME]``): a
    file that holds one comes back masked, so a value never leaves through a download. The
    outcome records the guest file's size and SHA-256 and, when masked, the names masked and
    the size and SHA-256 of what was delivered (what this returns)."""
    if isinstance(dest, str | bytes | os.PathLike) or not hasattr(dest, "write"):
        raise TypeError("download writes to a binary file object, never a file name")
    sink = _Digesting(dest)
    masker = guests.masker_for_records(vm.secrets_seen)
    writer = MaskingWriter(sink, masker)

    def after(transfer: Any) -> dict[str, Any]:
        masked = writer.close_stream()
        extra: dict[str, Any] = {
            "delivered_size": sink.size,
            "delivered_sha256": sink.digest.hexdigest(),
        }
        if masked:
            extra["masked_secrets"] = masked
        return extra

    return _transfer(
        caller,
        vm,
        "file_download",
        path,
        {},
        lambda agent: agent.get_file(
            path,
            writer,  # type: ignore[arg-type]
            timeout=settings.SANDBOX_GUEST_TRANSFER_TIMEOUT_S,
        ),
        after,
    )
