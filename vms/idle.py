"""Idle pause: a VM with an idle policy (``idle_timeout_s``, from its template at create or set
by its owner: ``commands.set_idle``) that nobody used for that long is paused by the system, and
the next exec or file request resumes it transparently before it goes on.

- Use is recorded outside the event log (it is not state): ``VMActivity.last_at``, written when
  every exec and file request starts (in its request's transaction, under the append lock:
  ``commands.request_guest_access``) and when it ends (in its outcome's transaction:
  ``commands.record_guest_outcome``), and by console input at most once per ``TOUCH_EVERY_S``
  (``touch_throttled``). A VM without a row counts from its last change of state (a resume, a
  start); the row goes with the VM's ``vm.destroyed`` (``commands.record_outcome``).
- The worker's main process looks every second (``core.ticks``): one query for the running VMs
  that have a policy; when one has run out it enqueues ``pause_idle_vms``, which asks each
  such VM's pause through ``commands.pause_idle``: the ordinary pause request, by the system,
  data ``{"reason": "idle", "idle_s", "idle_timeout_s"}``, decided under the append lock from
  the VM's use then (never while a guest request of it is in flight).
- ``wake``: before an exec or file request reaches a VM paused for idleness, its resume is
  appended (the system's, data ``{"reason": "activity", "for", "by"}``) and carried out here, in
  the web process, on the VM's host (the hypervisor's resume under the VM's host lock), its
  outcome appended: no worker round trip. A VM its owner paused is not woken (409 as before).
  A request that finds the idle pause asked and not yet carried out waits for its outcome (at
  most ``PAUSE_WAIT_S``) and then wakes it.

Suspend to disk (the policy's ``idle_to_disk``, from the template or ``set_idle``): the idle
pause's request carries ``to_disk``, and the worker (``vms.worker.suspend_to_disk``) saves the
guest's memory and device state with the driver's snapshot into the VM's data dir
(``runtime.suspend_dir``, with a SHA-256 manifest), then stops its VMM and unplugs its NIC; the
``vm.paused`` outcome says ``to_disk``, the reason, ``idle_s``, the size and the hashes. The VM
is ``paused`` with ``suspended_to_disk`` in its read model: it holds no host vCPUs or memory
(``vms.capacity``), the reconciler does not take its missing VMM for a crash, and the file (on
the data dir, not the runtime dir) outlives a host restart. ``wake`` then restores it
(``vms.worker.resume_from_disk``: the files checked, a new VMM, its NIC plugged again, the
guest greeted with the VM's own credential and given its clock, hostname and address), and the
file goes after a good restore; an owner's resume does the same through the worker. Only a
resume, stop, restore or destroy may be asked of it (``lifecycle.ON_DISK_VERBS``); a stop, a
restore, a start and a destroy drop the file.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from datetime import datetime, timedelta

from django.db.models import OuterRef, Subquery
from django.utils import timezone

from accounts.caller import Caller
from vms import commands, lifecycle, runtime, worker
from vms.models import VirtualMachine, VMActivity

__all__ = [
    "BATCH",
    "TOUCH_EVERY_S",
    "WakeFailed",
    "due",
    "idle_pause_pending",
    "pause_idle_vms",
    "tick",
    "touch",
    "touch_throttled",
    "wake",
]

log = logging.getLogger("sandbox.idle")

BATCH = 100  # VMs a run takes; the next tick finds the rest
TOUCH_EVERY_S = 5.0  # console input marks a VM used at most this often (per web process)
WAKE_WAIT_S = 30.0  # how long a request waits for another request's wake of the same VM
PAUSE_WAIT_S = 10.0  # how long a request waits for a pending idle pause before it resumes it
SUSPEND_WAIT_S = 60.0  # ... for a pending suspend to disk (it writes the guest's memory)
_RUN_S = 30
_enqueued_at: datetime | None = None
_touched: dict[uuid.UUID, float] = {}


class WakeFailed(Exception):
    """The VM paused for idleness could not be resumed (its resume failed, with an event)."""


def touch(vm_id: uuid.UUID | str, now: datetime | None = None) -> None:
    """The VM's guest was used now (one upsert, one query)."""
    commands.mark_used(vm_id, now or timezone.now())


def touch_throttled(vm_id: uuid.UUID | str) -> bool:
    """``touch`` at most once per ``TOUCH_EVERY_S`` per VM in this process (console input):
    whether it wrote."""
    key, now = uuid.UUID(str(vm_id)), time.monotonic()
    if now - _touched.get(key, -TOUCH_EVERY_S) < TOUCH_EVERY_S:
        return False
    _touched[key] = now
    touch(key)
    return True


def _candidates() -> list[tuple[uuid.UUID, int, datetime, datetime | None]]:
    """The VMs with an idle policy, not busy: (id, timeout, state changed at, last used at)."""
    last = VMActivity.objects.filter(vm_id=OuterRef("pk")).values("last_at")[:1]
    rows = (
        VirtualMachine.objects.filter(idle_timeout_s__isnull=False, pending_request="")
        .exclude(state=lifecycle.GONE)
        .annotate(last_at=Subquery(last))
        .values_list("pk", "state", "idle_timeout_s", "state_changed_at", "last_at")
    )
    return [
        (pk, int(t or 0), changed, used)
        for pk, state, t, changed, used in rows
        if t and lifecycle.may_idle(state)
    ]


def due(now: datetime, limit: int = BATCH) -> list[tuple[uuid.UUID, datetime]]:
    """The VMs whose idle policy has run out by ``now``: (id, unused since)."""
    found = []
    for pk, timeout, changed, used in _candidates():
        since = max(changed, used) if used else changed
        if now - since >= timedelta(seconds=timeout):
            found.append((pk, since))
    return sorted(found, key=lambda f: f[1])[:limit]


def pause_idle_vms(now: datetime | None = None) -> int:
    """Ask the pause of every VM whose idle policy has run out: the number of requests."""
    now = now or timezone.now()
    done = 0
    for vm_id, _since in due(now):
        try:
            # Checked again under the lock, from the VM's use then (not ``_since``).
            if commands.pause_idle(vm_id, now) is not None:
                done += 1
        except Exception:
            # One VM's failure (a conflict with a concurrent request) leaves it to the next run.
            log.warning("idle VM %s: not paused", vm_id, exc_info=True)
    return done


def tick(now: datetime) -> None:
    """``core.ticks``: enqueue ``pause_idle_vms`` when a VM's idle policy has run out (not
    again while one just enqueued may still be waiting)."""
    global _enqueued_at
    if _enqueued_at is not None and now - _enqueued_at < timedelta(seconds=_RUN_S):
        return
    if not due(now, limit=1):
        return
    from django_q.tasks import async_task

    async_task("vms.tasks.pause_idle_vms", task_name="vm-idle", save=False, timeout=_RUN_S * 2)
    _enqueued_at = now


def idle_pause_pending(vm: VirtualMachine) -> bool:
    """The system asked ``vm``'s pause for idleness and it has no outcome yet."""
    return vm.idle_paused and vm.pending_type == lifecycle.request_verb("pause").requested


def wake(caller: Caller, vm: VirtualMachine, kind: str) -> VirtualMachine:
    """``vm`` ready for ``kind`` (exec, file_upload, file_download): resumed first when the
    system paused it for idleness (its resume request and outcome in the log, reason
    ``activity``), else as it is. While the system's pause for idleness is still being carried
    out, waits for its outcome (at most ``PAUSE_WAIT_S``) and then resumes it; while another
    request is waking it, waits for that. The request's own append marks the VM used
    (``commands.request_guest_access``, in its transaction). ``WakeFailed`` when its resume
    failed (recorded)."""
    if idle_pause_pending(vm):
        vm = _wait_for_pause(vm.pk)
    if not lifecycle.wakes_on_activity(vm.state, vm.idle_paused):
        return vm
    request = commands.request_activity_resume(
        caller, vm, kind, claimed_by=f"web {runtime.host_name()}:{os.getpid()}"
    )
    if request is None:
        return _wait_for_wake(vm.pk)
    started = time.monotonic()
    resumed, failed = lifecycle.request_verb("resume").outcomes()
    # As the request found it (under the append lock): paused in its VMM, or on disk.
    on_disk = VirtualMachine.objects.filter(pk=vm.pk, suspended_to_disk=True).exists()
    restored: dict[str, object] = {}
    try:
        if on_disk:
            restored = worker.resume_from_disk(vm, request)
        else:
            with worker.vm_host_lock(vm.pk):
                runtime.hypervisor().resume(runtime.runtime_dir(vm.pk))
    except Exception as exc:
        reason = str(exc) if isinstance(exc, worker.RequestFailed) else f"resume failed: {exc}"
        commands.record_outcome_if_pending(
            request, failed, {"reason": reason[:2000], "state": "paused"}
        )
        raise WakeFailed(
            f"the VM was paused for idleness and could not be resumed: {reason}"
        ) from exc
    commands.record_outcome_if_pending(
        request,
        resumed,
        {
            **restored,
            "reason": "activity",
            "for": kind,
            "seconds": round(time.monotonic() - started, 4),
        },
    )
    touch(vm.pk)
    return VirtualMachine.objects.select_related("owner").get(pk=vm.pk)


def _wait_for_pause(vm_id: uuid.UUID) -> VirtualMachine:
    """The VM once the system's pause of it for idleness has its outcome (or as it is after
    ``PAUSE_WAIT_S``, ``SUSPEND_WAIT_S`` for a VM whose policy suspends it to disk: then the
    guest request meets a VM still pausing, 409 as for any busy VM)."""
    vm = VirtualMachine.objects.select_related("owner").get(pk=vm_id)
    deadline = time.monotonic() + (SUSPEND_WAIT_S if vm.idle_to_disk else PAUSE_WAIT_S)
    while True:
        if not idle_pause_pending(vm) or time.monotonic() > deadline:
            return vm
        time.sleep(0.02)
        vm = VirtualMachine.objects.select_related("owner").get(pk=vm_id)


def _wait_for_wake(vm_id: uuid.UUID) -> VirtualMachine:
    """The VM once another request's wake of it has settled (or as it is after WAKE_WAIT_S)."""
    resume = lifecycle.request_verb("resume").requested
    deadline = time.monotonic() + WAKE_WAIT_S
    while True:
        vm = VirtualMachine.objects.select_related("owner").get(pk=vm_id)
        if vm.pending_type != resume or time.monotonic() > deadline:
            return vm
        time.sleep(0.02)
