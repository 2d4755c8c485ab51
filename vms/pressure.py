"""Priorities under host pressure: a control loop on each host that takes memory back from the
VMs that matter least when the host runs short, and gives it back when the pressure passes.

- *Priority*: every VM has one (``high``, ``normal``, ``low``; from its template at create,
  changed by its owner: ``vm.priority_set``) and may opt out (``pressure_opt_out``).
- *Readings*: this host's ``MemAvailable`` and, where the kernel has ``/proc/pressure``, memory
  PSI ``some avg10`` (``vms.capacity.measure``, the same reading the heartbeat stores).
- *Pressure*: ``MemAvailable`` below ``SANDBOX_PRESSURE_MEM_AVAILABLE_MIB`` or memory PSI above
  ``SANDBOX_PRESSURE_MEM_PSI``. *Calm*: both past their release values
  (``SANDBOX_PRESSURE_RELEASE_*``); in between nothing moves (hysteresis).
- *Actions*: under pressure, every running low-priority VM not ballooned yet is ballooned down
  to ``1 - SANDBOX_PRESSURE_BALLOON_FRACTION`` of its memory (never below
  ``SANDBOX_PRESSURE_MIN_GUEST_MIB``); when the pressure outlasts the newest low balloon by
  ``SANDBOX_PRESSURE_ESCALATE_S`` (or there is no low VM), the normal-priority ones are. High
  never is, nor an opted-out VM. When calm, balloons at least ``SANDBOX_PRESSURE_HOLD_S`` old are
  released, normal-priority VMs before low ones (one class per pass, so giving back does not
  bring the pressure straight back). A VM that opts out or becomes high gets its memory back at
  once.
- *CPU*: CPU PSI ``some avg10`` above ``SANDBOX_PRESSURE_CPU_PSI`` lowers the CPU weight of
  every running low-priority VM's VMM cgroup to ``SANDBOX_PRESSURE_CPU_WEIGHT``; at or below
  ``SANDBOX_PRESSURE_RELEASE_CPU_PSI`` (after the hold time) it is set back to the VM's own.

Each action is done, then recorded (``vm.ballooned``, ``vm.balloon_released``,
``vm.cpu_lowered``, ``vm.cpu_restored``) with the reason and the readings and thresholds that
caused it; the VM's state does not move. Nothing is paused. An action whose event cannot be
appended (the store unavailable, a concurrent append) is undone at once (balloon and CPU weight
back to what they were), so the log never says what did not happen and nothing happens that it
does not say; an undo that fails is tried again each pass while the same VMM runs.

The worker's main process looks every ``SANDBOX_PRESSURE_PERIOD_S`` (``core.ticks``: two small
file reads and, when there may be something to do, one indexed query) and enqueues ``relieve``,
which decides (``decide``: a pure function of readings, VMs and thresholds) and acts; one run
per host at a time (a file lock), so an action is never done or recorded twice.
"""

from __future__ import annotations

import fcntl
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from django.conf import settings
from django.db.models import Q

from vms import capacity, commands, lifecycle, runtime
from vms.hypervisors.base import HypervisorError, NotSupported
from vms.models import VirtualMachine

__all__ = [
    "Action",
    "Candidate",
    "Readings",
    "Thresholds",
    "assess",
    "candidates",
    "decide",
    "read",
    "relieve",
    "tick",
]

log = logging.getLogger("sandbox.pressure")

# Who gives way first: the order of ballooning (high is never ballooned).
BALLOONED_FIRST = ("low", "normal")
# ... and of giving back: the more important first.
RELEASED_FIRST = ("normal", "low")

State = Literal["pressure", "calm", "between"]


@dataclass(frozen=True)
class Readings:
    """What the host reports now (None: not readable here)."""

    available_mib: int | None
    memory_psi: float | None  # memory PSI "some avg10", percent
    memory_mib: int | None = None  # MemTotal
    cpu_psi: float | None = None  # CPU PSI "some avg10", percent

    def as_data(self) -> dict[str, Any]:
        return {
            "mem_available_mib": self.available_mib,
            "psi_some_avg10": self.memory_psi,
            "cpu_psi_some_avg10": self.cpu_psi,
        }


@dataclass(frozen=True)
class Thresholds:
    available_mib: int
    psi: float
    release_available_mib: int
    release_psi: float
    fraction: float
    min_guest_mib: int
    hold_s: float
    escalate_s: float
    cpu_psi: float = 100.0
    release_cpu_psi: float = 100.0
    cpu_weight: int = 10

    @classmethod
    def from_settings(cls) -> Thresholds:
        return cls(
            available_mib=int(settings.SANDBOX_PRESSURE_MEM_AVAILABLE_MIB),
            psi=float(settings.SANDBOX_PRESSURE_MEM_PSI),
            release_available_mib=int(settings.SANDBOX_PRESSURE_RELEASE_AVAILABLE_MIB),
            release_psi=float(settings.SANDBOX_PRESSURE_RELEASE_PSI),
            fraction=float(settings.SANDBOX_PRESSURE_BALLOON_FRACTION),
            min_guest_mib=int(settings.SANDBOX_PRESSURE_MIN_GUEST_MIB),
            hold_s=float(settings.SANDBOX_PRESSURE_HOLD_S),
            escalate_s=float(settings.SANDBOX_PRESSURE_ESCALATE_S),
            cpu_psi=float(settings.SANDBOX_PRESSURE_CPU_PSI),
            release_cpu_psi=float(settings.SANDBOX_PRESSURE_RELEASE_CPU_PSI),
            cpu_weight=int(settings.SANDBOX_PRESSURE_CPU_WEIGHT),
        )

    def as_data(self) -> dict[str, Any]:
        return {
            "mem_available_mib": self.available_mib,
            "psi_some_avg10": self.psi,
            "release_available_mib": self.release_available_mib,
            "release_psi": self.release_psi,
            "cpu_psi_some_avg10": self.cpu_psi,
            "release_cpu_psi": self.release_cpu_psi,
        }


@dataclass(frozen=True)
class Candidate:
    """A running VM of this host as the loop sees it."""

    vm_id: uuid.UUID
    priority: str
    opt_out: bool
    memory_mib: int
    target_mib: int | None = None  # its balloon's target (None: not ballooned)
    ballooned_at: float | None = None  # epoch seconds
    cpu_weight: int | None = None  # its lowered CPU weight (None: its own)
    cpu_lowered_at: float | None = None


@dataclass(frozen=True)
class Action:
    """``target``: MiB for a balloon or a release, the CPU weight for ``cpu_lower`` (None for
    ``cpu_restore``: the VM's own)."""

    vm_id: uuid.UUID
    kind: Literal["balloon", "release", "cpu_lower", "cpu_restore"]
    target: int | None
    reason: str
    priority: str


def read(proc: Path = capacity.PROC) -> Readings:
    """This host's readings (``vms.capacity.measure``)."""
    m = capacity.measure(proc)
    return Readings(m["available_mib"], m["memory_pressure"], m["memory_mib"], m["cpu_pressure"])


def assess(r: Readings, t: Thresholds) -> tuple[State, str]:
    """Whether the host is under pressure, calm or in between, and why."""
    why = []
    if r.available_mib is not None and r.available_mib < t.available_mib:
        why.append(f"memory available {r.available_mib} MiB < {t.available_mib} MiB")
    if r.memory_psi is not None and r.memory_psi > t.psi:
        why.append(f"memory PSI some avg10 {r.memory_psi:.2f} > {t.psi:g}")
    if why:
        return "pressure", "; ".join(why)
    calm_mem = r.available_mib is None or r.available_mib >= t.release_available_mib
    calm_psi = r.memory_psi is None or r.memory_psi <= t.release_psi
    if calm_mem and calm_psi:
        return "calm", (
            f"memory available {r.available_mib} MiB >= {t.release_available_mib} MiB and "
            f"memory PSI some avg10 {r.memory_psi} <= {t.release_psi:g}"
        )
    return "between", "between the pressure and release thresholds"


def assess_cpu(r: Readings, t: Thresholds) -> tuple[State, str]:
    """The same for CPU: PSI ``some avg10`` of /proc/pressure/cpu against its thresholds."""
    if r.cpu_psi is None:
        return "between", "no CPU pressure reading on this host"
    if r.cpu_psi > t.cpu_psi:
        return "pressure", f"CPU PSI some avg10 {r.cpu_psi:.2f} > {t.cpu_psi:g}"
    if r.cpu_psi <= t.release_cpu_psi:
        return "calm", f"CPU PSI some avg10 {r.cpu_psi:.2f} <= {t.release_cpu_psi:g}"
    return "between", "between the CPU pressure and release thresholds"


def balloon_target(memory_mib: int, t: Thresholds) -> int:
    """What a VM of ``memory_mib`` keeps while ballooned."""
    return max(t.min_guest_mib, int(memory_mib * (1.0 - t.fraction)))


def decide(r: Readings, vms: Sequence[Candidate], t: Thresholds, now: float) -> list[Action]:
    """What to do now, given the readings, this host's running VMs and the thresholds."""
    state, why = assess(r, t)
    actions: list[Action] = []
    # Opted out or made high since it was ballooned: its memory back whatever the host says.
    for vm in vms:
        if vm.target_mib is not None and (vm.opt_out or vm.priority not in BALLOONED_FIRST):
            reason = "opted out" if vm.opt_out else f"priority {vm.priority}"
            actions.append(Action(vm.vm_id, "release", vm.memory_mib, reason, vm.priority))
        if vm.cpu_weight is not None and (vm.opt_out or vm.priority != "low"):
            reason = "opted out" if vm.opt_out else f"priority {vm.priority}"
            actions.append(Action(vm.vm_id, "cpu_restore", None, reason, vm.priority))
    eligible = [v for v in vms if not v.opt_out and v.priority in BALLOONED_FIRST]
    if state == "pressure":
        for priority in BALLOONED_FIRST:
            tier = [v for v in eligible if v.priority == priority]
            todo = [
                v
                for v in tier
                if v.target_mib is None and balloon_target(v.memory_mib, t) < v.memory_mib
            ]
            if todo:
                actions += [
                    Action(v.vm_id, "balloon", balloon_target(v.memory_mib, t), why, priority)
                    for v in todo
                ]
                break
            newest = max((v.ballooned_at or 0.0 for v in tier if v.target_mib), default=None)
            if newest is not None and now - newest < t.escalate_s:
                break  # the balloons of this class get their time before the next class's
    elif state == "calm":
        for priority in RELEASED_FIRST:
            held = [v for v in eligible if v.priority == priority and v.target_mib is not None]
            if not held:
                continue
            due = [v for v in held if now - (v.ballooned_at or 0.0) >= t.hold_s]
            actions += [Action(v.vm_id, "release", v.memory_mib, why, priority) for v in due]
            break  # one class per pass: the next only once this one is all back
    # CPU: only low-priority VMs give way (a lower weight costs them nothing while the CPUs
    # are free, so nothing escalates to normal).
    cpu_state, cpu_why = assess_cpu(r, t)
    low = [v for v in vms if not v.opt_out and v.priority == "low"]
    if cpu_state == "pressure":
        actions += [
            Action(v.vm_id, "cpu_lower", t.cpu_weight, cpu_why, v.priority)
            for v in low
            if v.cpu_weight is None
        ]
    elif cpu_state == "calm":
        actions += [
            Action(v.vm_id, "cpu_restore", None, cpu_why, v.priority)
            for v in low
            if v.cpu_weight is not None and now - (v.cpu_lowered_at or 0.0) >= t.hold_s
        ]
    return actions


# --- Acting ----------------------------------------------------------------------------------


def _host_vms() -> Any:
    return VirtualMachine.objects.filter(
        host=runtime.host_name(), state__in=lifecycle.BALLOONABLE
    ).order_by("created_at")


def candidates(vms: Iterable[VirtualMachine]) -> list[Candidate]:
    return [
        Candidate(
            vm_id=vm.pk,
            priority=vm.priority,
            opt_out=vm.pressure_opt_out,
            memory_mib=vm.memory_mib,
            target_mib=vm.balloon_target_mib,
            ballooned_at=vm.ballooned_at.timestamp() if vm.ballooned_at else None,
            cpu_weight=vm.cpu_weight,
            cpu_lowered_at=vm.cpu_lowered_at.timestamp() if vm.cpu_lowered_at else None,
        )
        for vm in vms
    ]


# What a VM's VMM cannot do (no balloon device: started before balloons existed; no cgroup of
# its own: not jailed), by (VM, "memory" | "cpu"), with the VMM's pid it was found for.
_cannot: dict[tuple[uuid.UUID, str], int | None] = {}
# Actions done whose event could not be appended and whose undo failed too, by (VM, family):
# (kind, the event's fields, the VMM's pid); undone at the start of the next passes.
_unrecorded: dict[tuple[uuid.UUID, str], tuple[str, dict[str, Any], int | None]] = {}
_EVENTS = {
    "balloon": "vm.ballooned",
    "release": "vm.balloon_released",
    "cpu_lower": "vm.cpu_lowered",
    "cpu_restore": "vm.cpu_restored",
}


def _lock_path() -> Path:
    return Path(settings.SANDBOX_RUNTIME_DIR) / ".pressure.lock"


def relieve(readings: Readings | None = None) -> list[dict[str, Any]]:
    """One pass of the loop on this host: decide, act, record. Returns the events' data. A pass
    already running on this host: nothing (the next tick comes soon)."""
    path = _lock_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []
        return _relieve(readings if readings is not None else read())


def _family(kind: str) -> str:
    return "cpu" if kind.startswith("cpu") else "memory"


def _act(hv: Any, rt: Any, action: Action) -> dict[str, Any] | None:
    """Do ``action``; the fields its event gets, or None when the VMM cannot do it."""
    if _family(action.kind) == "memory":
        before = hv.balloon_mib(rt)
        if before is None:
            return None
        assert action.target is not None
        hv.balloon(rt, action.target)
        return {"before_mib": before, "target_mib": action.target}
    try:
        before = hv.set_cpu_weight(rt, action.target)
    except NotSupported:
        return None
    return {"before": before, "weight": action.target}


def _undo(hv: Any, rt: Any, kind: str, fields: dict[str, Any]) -> None:
    """Put the VMM back to what it had before an action whose event could not be appended."""
    if _family(kind) == "memory":
        hv.balloon(rt, fields["before_mib"])
    else:
        hv.set_cpu_weight(rt, fields["before"])


def _undo_unrecorded(hv: Any, rt: Any, action: Action, fields: dict[str, Any], why: str) -> None:
    """An action done whose event could not be appended (the store unavailable, a concurrent
    append): undone at once, so nothing happens that the log does not say. An undo that fails
    too is kept and tried again at the start of every pass while the same VMM runs."""
    key = (action.vm_id, _family(action.kind))
    try:
        _undo(hv, rt, action.kind, fields)
    except Exception as exc:
        _unrecorded[key] = (action.kind, fields, rt.pid())
        log.error(
            "pressure: %s of VM %s could not be recorded (%s) nor undone (%s): tried again "
            "next pass",
            action.kind,
            action.vm_id,
            why,
            exc,
        )
        return
    _unrecorded.pop(key, None)
    log.warning(
        "pressure: %s of VM %s could not be recorded (%s): undone (%s)",
        action.kind,
        action.vm_id,
        why,
        fields,
    )


def _undo_pending(hv: Any) -> set[tuple[uuid.UUID, str]]:
    """Retry the undos that failed before; their keys (not acted on again in this pass)."""
    tried = set(_unrecorded)
    for key, (kind, fields, pid) in list(_unrecorded.items()):
        rt = runtime.runtime_dir(key[0])
        if pid is None or rt.pid() != pid:
            del _unrecorded[key]  # that VMM is gone, and what was done to it with it
            continue
        try:
            _undo(hv, rt, kind, fields)
        except Exception as exc:
            log.error("pressure: undo of %s of VM %s failed again: %s", kind, key[0], exc)
            continue
        del _unrecorded[key]
        log.warning("pressure: %s of VM %s undone (%s)", kind, key[0], fields)
    return tried


def _relieve(r: Readings) -> list[dict[str, Any]]:
    t = Thresholds.from_settings()
    hv = runtime.hypervisor()
    pending = _undo_pending(hv)
    rows = {vm.pk: vm for vm in _host_vms()}
    for key, pid in list(_cannot.items()):
        if key[0] not in rows or runtime.runtime_dir(key[0]).pid() != pid:
            del _cannot[key]
    done: list[dict[str, Any]] = []
    acted: set[tuple[uuid.UUID, str]] = set(pending)
    while True:
        actions = [
            a
            for a in decide(r, candidates(rows.values()), t, time.time())
            if (a.vm_id, _family(a.kind)) not in _cannot and (a.vm_id, _family(a.kind)) not in acted
        ]
        retry = False
        for action in actions:
            key = (action.vm_id, _family(action.kind))
            rt = runtime.runtime_dir(action.vm_id)
            acted.add(key)
            try:
                fields = _act(hv, rt, action)
            except (HypervisorError, OSError) as exc:
                log.warning("pressure: %s of VM %s failed: %s", action.kind, action.vm_id, exc)
                continue
            if fields is None:
                _cannot[key] = rt.pid()
                retry = True  # decide again without it (the next class may be due)
                continue
            data = {
                "action": action.kind,
                "reason": action.reason,
                "priority": action.priority,
                **r.as_data(),
                "threshold": t.as_data(),
                **fields,
            }
            event_type = _EVENTS[action.kind]
            try:
                commands.record_pressure_action(action.vm_id, event_type, data)
            except Exception as exc:
                # Not in the log: not done either (the VMM goes back to what it had).
                _undo_unrecorded(hv, rt, action, fields, f"{type(exc).__name__}: {exc}")
                continue
            done.append({"vm_id": str(action.vm_id), "type": event_type, **data})
        if not retry:
            return done


# --- The tick -----------------------------------------------------------------------------------

_next_look = 0.0


def _worth_a_pass(state: State, cpu_state: State) -> bool:
    qs = _host_vms()
    if (
        state == "pressure"
        and qs.filter(pressure_opt_out=False, priority__in=BALLOONED_FIRST).exists()
    ):
        return True
    if cpu_state == "pressure" and qs.filter(pressure_opt_out=False, priority="low").exists():
        return True
    memory, cpu = Q(balloon_target_mib__isnull=False), Q(cpu_weight__isnull=False)
    if state == "calm" and qs.filter(memory).exists():
        return True
    if cpu_state == "calm" and qs.filter(cpu).exists():
        return True
    # Whatever the readings: opt-outs and raised priorities to give back.
    return qs.filter(
        (memory & (Q(pressure_opt_out=True) | Q(priority="high")))
        | (cpu & (Q(pressure_opt_out=True) | ~Q(priority="low")))
    ).exists()


def tick(now: datetime) -> None:
    """``core.ticks``: every ``SANDBOX_PRESSURE_PERIOD_S``, read the host and, when there may be
    something to do, enqueue a pass (``relieve``)."""
    global _next_look
    if not settings.SANDBOX_PRESSURE_ENABLED:
        return
    at = now.timestamp()
    if at < _next_look:
        return
    _next_look = at + float(settings.SANDBOX_PRESSURE_PERIOD_S)
    readings, t = read(), Thresholds.from_settings()
    if not _worth_a_pass(assess(readings, t)[0], assess_cpu(readings, t)[0]):
        return
    from django_q.tasks import async_task

    async_task("vms.tasks.relieve_pressure", task_name="pressure", save=False, timeout=30)
