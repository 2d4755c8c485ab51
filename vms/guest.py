"""Guest access from the web tier: exec and file transfer through the agent, each one audited.

A VMM's agent channel takes one client at a time (QEMU's chardev socket), so sessions to one VM
are serialized across processes on the host with a lock file in its runtime directory; a waiter
gives up after a deadline with a clear error.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from django.conf import settings

from accounts.caller import Caller
from vms import commands, runtime
from vms.models import VirtualMachine

AGENT_LOCK_WAIT_S = 30.0
RECORDED_OUTPUT = 65536  # bytes of each stream in the event, with SANDBOX_EXEC_RECORD_OUTPUT


class GuestUnavailable(Exception):
    """The guest cannot be reached now (not running, agent not answering, channel busy)."""


@contextlib.contextmanager
def agent_session(vm: VirtualMachine, *, hello_timeout: float = 20.0) -> Iterator[Any]:
    from vms.agent.client import AgentClient, AgentError
    from vms.hypervisors.base import HypervisorError

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
        client = AgentClient.from_hypervisor(runtime.hypervisor(), rt)
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


def require_guest_access(caller: Caller, vm: VirtualMachine, perm: str) -> None:
    """May ``caller`` use ``perm`` on the guest of ``vm`` now? Checked before a request body
    is read, so a caller without the permission never has an upload parsed."""
    caller.require(perm)
    if vm.owner_id != caller.user.pk and not caller.user.has_perm("vms.manage_all_vms"):
        from django.core.exceptions import PermissionDenied

        raise PermissionDenied("you may only act on your own VMs")
    if vm.state != "running":
        raise commands.InvalidState(vm, "reach the guest of", frozenset({"running"}))


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
    """One output stream: counted and hashed in full, its first ``limit`` bytes kept."""

    def __init__(self, forward: Callable[[bytes], None] | None, limit: int) -> None:
        self.kept = bytearray()
        self.limit = limit
        self.size = 0
        self.digest = hashlib.sha256()
        self.forward = forward

    def __call__(self, chunk: bytes) -> None:
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
) -> ExecOutcome:
    """Run ``argv`` in the guest and record ``vm.exec_completed`` (argv, cwd, exit, duration,
    output sizes and SHA-256; the output itself only with SANDBOX_EXEC_RECORD_OUTPUT).

    The outcome holds the first ``keep`` bytes of each stream (default
    SANDBOX_EXEC_OUTPUT_LIMIT) and the full sizes; the rest goes to ``on_stdout``/``on_stderr``
    (a stream) or nowhere, so a request's memory is bounded whatever the command prints.
    """
    require_guest_access(caller, vm, "vms.exec_vm")
    limit = settings.SANDBOX_EXEC_OUTPUT_LIMIT if keep is None else keep
    if settings.SANDBOX_EXEC_RECORD_OUTPUT:
        limit = max(limit, RECORDED_OUTPUT)
    out, err = _Capture(on_stdout, limit), _Capture(on_stderr, limit)
    started = time.monotonic()
    with agent_session(vm) as agent:
        result = agent.exec(
            argv,
            cwd=cwd,
            env=env,
            stdin=stdin,
            timeout=timeout,
            on_stdout=out,
            on_stderr=err,
            wait_timeout=timeout + 30,
            keep=0,  # kept here, once
        )
    details: dict[str, Any] = {
        "argv": argv,
        "cwd": cwd,
        "env_keys": sorted(env or {}),  # values may hold secrets: names only
        "exit_code": result.exit_code,
        "signal": getattr(result, "signal", None),
        "timed_out": result.timed_out,
        "duration_s": round(result.duration_s, 4),
        "wall_s": round(time.monotonic() - started, 4),
        "stdin_size": len(stdin or b""),
        "stdout_size": out.size,
        "stdout_sha256": out.digest.hexdigest(),
        "stderr_size": err.size,
        "stderr_sha256": err.digest.hexdigest(),
    }
    if settings.SANDBOX_EXEC_RECORD_OUTPUT:
        details["stdout"] = bytes(out.kept[:RECORDED_OUTPUT]).decode(errors="replace")
        details["stderr"] = bytes(err.kept[:RECORDED_OUTPUT]).decode(errors="replace")
    event = commands.record_exec(caller, vm, details)
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
    from django.core.exceptions import ValidationError

    if not path or not path.startswith("/") or "\x00" in path or len(path) > 4096:
        raise ValidationError({"path": "an absolute path in the guest (at most 4096 characters)"})
    return path


def upload(caller: Caller, vm: VirtualMachine, path: str, source: IO[bytes]) -> tuple[int, str]:
    require_guest_access(caller, vm, "vms.write_files")
    path = validate_guest_path(path)
    with agent_session(vm) as agent:
        transfer = agent.put_file(source, path, mkdirs=True)
    commands.record_file_transfer(
        caller, vm, direction="upload", path=path, size=transfer.size, sha256=transfer.sha256
    )
    return transfer.size, transfer.sha256


def download(caller: Caller, vm: VirtualMachine, path: str, dest: Path) -> tuple[int, str]:
    require_guest_access(caller, vm, "vms.read_files")
    path = validate_guest_path(path)
    with agent_session(vm) as agent:
        transfer = agent.get_file(path, dest)
    commands.record_file_transfer(
        caller, vm, direction="download", path=path, size=transfer.size, sha256=transfer.sha256
    )
    return transfer.size, transfer.sha256
