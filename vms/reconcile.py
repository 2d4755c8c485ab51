"""Bring the VM read models in line with the VMM processes that really exist on this host.

Runs when the worker starts (``startup=True``: no task of this host is running, so every request
a worker had claimed but not finished was interrupted and gets settled; unclaimed ones are still
queued and left alone) and every minute (claimed requests only once they outlive the task
timeout; unclaimed ones sitting for minutes are enqueued again). It
appends ``vm.crashed`` for a VM whose VMM died, settles interrupted requests with an outcome
(``vm.started`` if the guest did come up, else ``vm.start_failed`` with the reason), and kills VMM
processes that belong to no live VM. A task delivered again later finds the outcome and does
nothing. What each verb's interrupted request comes to is the lifecycle table's
(``vms.lifecycle``, ``on_interrupt``). Guest requests (exec, file transfers) left without an
outcome beyond their verb's time limit (``time_limit``) get their failure event, interrupted.
Last, the TAPs, rules and resolvers of VMs that are no longer live are removed from the
product's network namespace (``vms.vmnet.remove_orphans``).
"""

from __future__ import annotations

import contextlib
import logging
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from audit import store
from audit.actor import Actor
from audit.models import Event
from vms import commands, enqueue, lifecycle, runtime, vmnet, worker
from vms.hypervisors import reconcile as scanner
from vms.models import PoolMember, VirtualMachine

log = logging.getLogger("sandbox.vms.reconcile")

SYSTEM = Actor(kind="system", username="reconciler", channel="worker")
REQUEUE_AFTER_S = 120  # a request nobody claimed for this long gets enqueued again
# On top of a guest verb's time limit: waiting for the agent's lock and hello, the client's
# grace after an exec's deadline, a slow append of the outcome.
GUEST_MARGIN_S = commands.GUEST_MARGIN_S
# How far back the minutely pass looks for guest requests without an outcome (the pass at
# startup looks at the whole log: the reconciler may have been down for longer).
GUEST_LOOKBACK_S = 86400
_GUEST_BATCH = 500


def _guest_time_limit(row: lifecycle.Verb) -> float:
    assert row.time_limit is not None, f"guest verb {row.name} has no time limit"
    return float(getattr(settings, row.time_limit))


def settle_guest_requests(*, startup: bool = False) -> int:
    """Settle guest requests (the lifecycle table's guest verbs: exec, file transfers) that have
    waited for their outcome longer than their verb may run plus a margin: the web process that
    asked the agent died in between. Each gets its verb's failure event, caused by it, with
    reason "interrupted" (what happened in the guest is not known). Returns how many."""
    now = timezone.now()
    settled = 0
    for row in lifecycle.GUEST_VERBS:
        limit = _guest_time_limit(row)
        before = now - timedelta(seconds=limit + GUEST_MARGIN_S)
        requests = Event.objects.filter(type=row.request_type(), recorded_at__lt=before)
        if not startup:
            requests = requests.filter(
                recorded_at__gte=before - timedelta(seconds=GUEST_LOOKBACK_S)
            )
        after = 0
        while True:
            batch = [
                store.RecordedEvent.from_row(r)
                for r in requests.filter(position__gt=after)
                .order_by("position")
                .values_list(*store.COLUMNS)[:_GUEST_BATCH]
            ]
            if not batch:
                break
            after = batch[-1].position
            answered = set(
                Event.objects.filter(
                    type__in=row.outcomes(),
                    position__gt=batch[0].position,
                    causation_id__in=[str(r.event_id) for r in batch],
                ).values_list("causation_id", flat=True)
            )
            for request in batch:
                if str(request.event_id) in answered:
                    continue
                asked = request.data.get("timeout")
                if isinstance(asked, int | float) and asked > limit:
                    # Asked for longer than the limit (by a version without it): its own bound.
                    if request.recorded_at >= now - timedelta(seconds=asked + GUEST_MARGIN_S):
                        continue
                data = {
                    "reason": (
                        f"interrupted: no outcome was recorded within {limit + GUEST_MARGIN_S:.0f}"
                        " s (the process that asked the guest stopped); what happened in the "
                        "guest is not known"
                    ),
                    "code": "interrupted",
                    "interrupted": True,
                }
                if commands.settle_interrupted_guest_request(SYSTEM, request, data) is not None:
                    settled += 1
                    log.warning("guest request %s settled as interrupted", request.event_id)
    return settled


def _settle(vm: VirtualMachine, alive: bool) -> str:
    request = worker.load_request(vm.pending_request)
    if request is None:
        return "no request"
    row = lifecycle.by_request(request.type)
    if row is None or row.kind != "request":
        return "not a worker's request"
    verb = row.name
    succeeded, failed = row.outcomes()
    hv, rt = runtime.hypervisor(), runtime.runtime_dir(vm.pk)
    if row.on_interrupt == "guest_up":
        if alive:
            try:
                with worker._agent(vm, 30.0):
                    pass
                worker._configure_identity(vm)
                outcome = succeeded
                data = {"host": runtime.host_name(), "hypervisor": hv.name, "recovered": True}
                # What the VMM really runs (recorded before its launch), or "" when that is not
                # known: never the image of an earlier boot, which the read model still holds.
                data["image_id"] = runtime.launched_image(rt) or ""
                # Only while the VM still waits for it: a destroy may have come in meanwhile.
                if commands.record_outcome_if_pending(request, outcome, data) is (
                    commands.SUPERSEDED
                ):
                    worker._record_superseded(
                        vm, request, verb, launched=True, would_have_been=(outcome, data)
                    )
                    return "superseded"
                if vm.suspended_to_disk:
                    worker.drop_suspended(vm.pk)  # restored from it: its saved state goes
                return "completed"
            except Exception as exc:  # noqa: BLE001 - any failure: the guest is not usable
                log.warning("interrupted %s of %s: guest not answering: %s", verb, vm.pk, exc)
        with contextlib.suppress(Exception):
            hv.destroy(rt)
        if vm.suspended_to_disk and worker.suspended_complete(vm.pk):
            # A restore from disk cut short: the VM is still suspended, its file kept.
            commands.record_outcome(
                request,
                failed,
                {
                    "reason": f"the worker stopped during the {verb}; the saved state is kept",
                    "state": "paused",
                },
            )
            return "failed"
        commands.record_outcome(
            request,
            failed,
            {
                "reason": f"the worker stopped during the {verb}; the guest did not come up",
                "state": "failed",
            },
        )
        return "failed"
    if row.on_interrupt == "finish":
        # What was asked ends with the VMM gone: tear it down, run the handler again (with no
        # VMM left it only finishes up: a destroy removes the VM's files) and say so.
        with contextlib.suppress(Exception):
            hv.destroy(rt)
        worker.HANDLERS[verb](vm, request)
        commands.record_outcome(request, succeeded, {"recovered": True})
        return "completed"
    if request.data.get("to_disk"):  # the idle policy's suspend to disk (vms.idle)
        if not alive and worker.suspended_complete(vm.pk):
            # Its state was saved and its VMM stopped: only the outcome was missing.
            commands.record_outcome(
                request,
                succeeded,
                {"to_disk": True, "recovered": True, "reason": request.data.get("reason", "")},
            )
            return "completed"
        worker.drop_suspended(vm.pk)  # a save cut short, or its VMM still runs: not suspended
    # "report" (pause, resize, snapshot): failed, where the VM really is.
    state = "crashed"
    if alive:
        with contextlib.suppress(Exception):
            state = hv.info(rt).state.value
    commands.record_outcome(
        request,
        failed,
        {
            "reason": f"the worker stopped during the {verb}",
            "state": state if state != "dead" else "crashed",
        },
    )
    return "failed"


def _member_keys() -> set[str]:
    return {m.hex[:12] for m in PoolMember.objects.values_list("pk", flat=True)}


def reconcile(*, startup: bool = False) -> dict[str, int]:
    root = Path(settings.SANDBOX_RUNTIME_DIR)
    # Warm pool members (vms.pools) are VMMs of no VM yet: not orphans; the pools' refill
    # evicts those whose VMM died. Read before the VMs: a hand-out that commits in between (the
    # member's row gone, its VM's row new) is then in one of the two reads.
    members = _member_keys()
    vms = list(VirtualMachine.objects.exclude(state=lifecycle.GONE))
    by_key = {vm.pk.hex[:12]: vm for vm in vms}
    known = by_key.keys() | members
    report = scanner.scan(root, known_ids=known) if root.is_dir() else scanner.ReconcileReport()
    if report.orphans:
        # A VMM whose VM or member was recorded after the reads above (a create, a hand-out or
        # a warm that committed meanwhile) is not an orphan: ask again before killing it.
        now_known = _member_keys() | {
            pk.hex[:12]
            for pk in VirtualMachine.objects.exclude(state=lifecycle.GONE).values_list(
                "pk", flat=True
            )
        }
        report.orphans = [o for o in report.orphans if o.vm_id not in now_known]
    counts = {"orphans": len(report.orphans), "crashed": 0, "settled": 0, "requeued": 0, "stray": 0}
    if report.orphans:
        scanner.teardown_orphans(report.orphans)
    now = timezone.now()
    stale_before = now - timedelta(seconds=float(settings.Q_CLUSTER["retry"]))  # type: ignore[arg-type]
    lost_before = now - timedelta(seconds=REQUEUE_AFTER_S)
    for key, vm in by_key.items():
        alive = key in report.alive
        if vm.pending_request:
            request = worker.load_request(vm.pending_request)
            if request is None:
                continue
            if worker.is_claimed(request):
                # Claimed but no outcome: interrupted if no task of this host can be running.
                if startup or vm.state_changed_at < stale_before:
                    _settle(vm, alive)
                    counts["settled"] += 1
            elif vm.state_changed_at < lost_before:
                # Never picked up (a lost queue message): deliver it again; claims dedupe.
                enqueue.request(request.event_id)
                counts["requeued"] += 1
            continue
        if vm.state in ("running", "paused") and not alive and not vm.suspended_to_disk:
            # (A VM suspended to disk has no VMM: its state is in a file; vms.idle.)
            commands.record_crashed(
                str(vm.pk),
                {"reason": "the VMM process is gone", "host": runtime.host_name()},
                actor=SYSTEM,
            )
            counts["crashed"] += 1
            worker._unplug(vm)  # its NIC goes with its VMM; a restart plugs a new one
        elif vm.state in ("stopped", "failed", "crashed", "creating") and alive:
            with contextlib.suppress(Exception):
                runtime.hypervisor().destroy(runtime.runtime_dir(vm.pk))
            counts["stray"] += 1
    counts["guest_settled"] = settle_guest_requests(startup=startup)
    # TAPs, rules and resolvers of VMs that are gone (a destroy interrupted, a crash): after the
    # VMs' own settling, so that a VM this pass found dead is not counted live.
    try:
        orphans = vmnet.remove_orphans()
    except Exception:  # the rest of the reconcile stands; the next pass tries again
        log.exception("removing orphaned network interfaces and rules failed")
        orphans = {}
    counts.update({f"net_{k}": v for k, v in orphans.items()})
    if any(counts.values()):
        log.info("reconciled", extra=counts)
    return counts
