"""Supervision of VMM processes, shared by the QEMU and Cloud Hypervisor drivers.

A VMM runs in its own session (so that restarting a web or worker process does not take VMs down
with it), writes stdout/stderr to ``vmm.log`` in its runtime directory and is remembered by a
pidfile. A pid alone is not an identity (pids are reused), so a process counts as "this VM's VMM"
only when ``/proc/<pid>/cmdline`` names the expected executable *and* mentions the VM's runtime
directory. No function here goes through a shell.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .base import HypervisorError, RuntimeDir

__all__ = [
    "ProcInfo",
    "check_peer",
    "iter_processes",
    "process_cmdline",
    "process_matches",
    "reap",
    "spawn_vmm",
    "terminate",
    "wait_for",
]

# Popen objects of the VMMs this process started: kept so that they can be reaped (a dead child
# that nobody waits for stays a zombie, and a zombie still has a /proc entry).
_children: dict[int, subprocess.Popen[bytes]] = {}
_children_lock = threading.Lock()
_reaper: threading.Thread | None = None
REAP_INTERVAL_S = 1.0


def _reap_children() -> None:
    """Collect every VMM child of this process that has exited, whoever stopped it.

    A VMM is stopped by whichever worker process handles the request (or it powers off), but
    only the process that started it can wait for it: without this, a worker process collects
    zombies of every VM it ever started. Runs in a daemon thread started with the first VMM.
    """
    while True:
        time.sleep(REAP_INTERVAL_S)
        with _children_lock:
            procs = list(_children.values())
        for proc in procs:
            if proc.poll() is not None:
                with _children_lock:
                    if _children.get(proc.pid) is proc:
                        del _children[proc.pid]


def _start_reaper() -> None:
    global _reaper
    with _children_lock:
        if _reaper is None or not _reaper.is_alive():
            _reaper = threading.Thread(target=_reap_children, name="vmm-reaper", daemon=True)
            _reaper.start()


def _forget_children_after_fork() -> None:
    """A forked child cannot wait for its parent's children; the reaper thread is not there."""
    global _reaper, _children_lock
    _children_lock = threading.Lock()  # another thread may have held it at the fork
    _children.clear()
    _reaper = None


os.register_at_fork(after_in_child=_forget_children_after_fork)


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    argv: tuple[str, ...]


def spawn_vmm(
    argv: Sequence[str],
    runtime: RuntimeDir,
    *,
    pass_fds: Sequence[int] = (),
    env: dict[str, str] | None = None,
    launcher: Sequence[str] = (),
    launch_timeout: float = 30.0,
) -> int:
    """Start ``argv`` in a new session with output appended to ``vmm.log``; write the pidfile.

    Returns the pid. The pidfile is written atomically (rename) so a concurrent reader never sees
    a half-written number.

    ``launcher``: a command that runs ``argv`` for us (``jail.launcher_argv`` + ``--``): it sets
    the VMM up, forks it, writes the VMM's pid to the pidfile itself and exits; its exit status
    says whether the VMM was exec'd (its reason for a refusal is in ``vmm.log``).
    """
    runtime.create()
    if launcher:
        runtime.pidfile.unlink(missing_ok=True)
    with open(runtime.vmm_log, "ab", buffering=0) as log:
        log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} start: {list(argv)!r}\n".encode())
        try:
            proc = subprocess.Popen(
                [*launcher, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                pass_fds=tuple(pass_fds),
                env=env,
            )
        except OSError as exc:
            raise HypervisorError(f"cannot start {argv[0]}: {exc}") from exc
    if launcher:
        try:
            code = proc.wait(timeout=launch_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise HypervisorError(
                f"the VMM launcher took more than {launch_timeout:.0f}s"
            ) from None
        pid = runtime.pid()
        if code != 0 or pid is None:
            raise HypervisorError(f"the VMM launcher failed (status {code}): {_last_line(runtime)}")
        return pid
    with _children_lock:
        _children[proc.pid] = proc
    _start_reaper()
    tmp = runtime.pidfile.with_suffix(".tmp")
    tmp.write_text(f"{proc.pid}\n")
    tmp.replace(runtime.pidfile)
    return proc.pid


def _last_line(runtime: RuntimeDir) -> str:
    try:
        lines = runtime.vmm_log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def reap(pid: int) -> int | None:
    """Collect ``pid`` if it is a dead child of ours; return its exit status if it was reaped."""
    with _children_lock:
        proc = _children.get(pid)
    if proc is not None:
        code = proc.poll()
        if code is not None:
            with _children_lock:
                _children.pop(pid, None)
        return code
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None  # not our child: init (or a subreaper) reaps it
    return os.waitstatus_to_exitcode(status) if done else None


def _state(pid: int) -> str | None:
    """The one-letter state from /proc/<pid>/stat (``Z`` zombie), or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw.rpartition(")")[2].split()[0]


def process_cmdline(pid: int, settle: float = 0.5) -> tuple[str, ...] | None:
    """The argv of a live, non-zombie process, or None.

    A process can show an empty cmdline for a moment right after exec (measured here: QEMU in
    its first tens of milliseconds), which must not read as "dead": an empty answer from a
    live non-zombie is retried for up to ``settle`` seconds.
    """
    deadline = time.monotonic() + settle
    while True:
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return None
        if raw:
            return tuple(part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0"))
        state = _state(pid)
        if state in (None, "Z", "X") or time.monotonic() >= deadline:
            return None  # zombies have an empty cmdline for good
        try:
            os.readlink(f"/proc/{pid}/exe")
        except OSError:
            return None  # kernel threads have no executable (and no cmdline)
        time.sleep(0.005)


def process_matches(pid: int | None, exe_names: Sequence[str], marker: str) -> bool:
    """True if ``pid`` is alive, runs one of ``exe_names`` and has ``marker`` in its argv."""
    if pid is None or pid <= 0:
        return False
    reap(pid)
    argv = process_cmdline(pid)
    if not argv:
        return False
    if os.path.basename(argv[0]) not in exe_names:
        return False
    return any(marker in arg for arg in argv[1:])


def iter_processes(exe_names: Sequence[str]) -> Iterator[ProcInfo]:
    """Every live process whose argv[0] basename is one of ``exe_names``."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        argv = process_cmdline(int(entry.name), settle=0.0)
        if argv and os.path.basename(argv[0]) in exe_names:
            yield ProcInfo(int(entry.name), argv)


def check_peer(sock: socket.socket, pid: int | None, what: str) -> None:
    """Refuse a unix socket that is not served by process ``pid`` (``SO_PEERCRED``: the
    process that listened, as this namespace sees it). A VMM owns the sockets in its runtime
    directory and could put a link to another server's socket in their place; the peer's pid
    cannot be faked, and it is the host pid even for a VMM in its own PID namespace."""
    if pid is None:
        raise HypervisorError(f"{what}: no VMM pid to check the socket against")
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    peer = struct.unpack("3i", raw)[0]
    if peer != pid:
        raise HypervisorError(f"{what} is served by pid {peer}, not the VMM (pid {pid})")


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate()`` until true or ``timeout`` seconds pass; return its last verdict."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _gone(pid: int, exe_names: Sequence[str], marker: str) -> bool:
    return not process_matches(pid, exe_names, marker)


def terminate(
    pid: int | None,
    exe_names: Sequence[str],
    marker: str,
    timeout: float = 5.0,
) -> bool:
    """SIGTERM the VMM's process group, SIGKILL it at the deadline, and reap it.

    The whole group is signalled because a VMM may have helpers of its own (QEMU's ``exec:``
    migration runs ``sh -c cat``). Nothing is signalled unless ``pid`` is verifiably the VMM
    (pid reuse). Returns True if a process was stopped, False if there was none.
    """
    if not process_matches(pid, exe_names, marker):
        if pid:
            reap(pid)
        return False
    assert pid is not None
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, max(timeout, 2.0))):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            try:
                os.killpg(pid, sig)  # the VMM leads its own session and group
            except ProcessLookupError:
                os.kill(pid, sig)
        if wait_for(lambda: _gone(pid, exe_names, marker), wait):
            break
    else:
        raise HypervisorError(f"VMM pid {pid} survived SIGKILL for {timeout:.0f}s")
    # Reap for real: block briefly for our own child so no zombie is left behind.
    with _children_lock:
        proc = _children.pop(pid, None)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2.0)
    return True
