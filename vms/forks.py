"""A fork's progress: how many of its N new VMs run, failed or are still being restored.

A fork (``commands.fork``) is one snapshot request of its source, whose data names the new VMs
(``fork.vm_ids``), and one restore request per new VM that waits for the snapshot. Its status
is read from the log (that request, found on the source's own events) and from the read model
(the new VMs' rows): a VM whose fork restore is still asked is pending, one that runs counts as
running, one whose VMM failed or died as failed; any other state (stopped, paused, destroyed
since) is ``other``. ``GET /api/v1/vms/{id}/forks/{snapshot_id}/`` and the dashboard's fork page
answer it; the SDK and the CLI wait on it with a progress bar.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings

from accounts.caller import Caller
from audit.models import Event
from vms import lifecycle, policy
from vms.models import Snapshot, VirtualMachine

__all__ = ["fork_limit", "status", "status_path"]


def fork_limit() -> int:
    """How many new VMs one fork may make (SANDBOX_FORK_MAX; ``commands.validate_fork_count``)."""
    return int(settings.SANDBOX_FORK_MAX)


def status_path(source_id: uuid.UUID | str, snapshot_id: uuid.UUID | str) -> str:
    """The API's status URL of a fork (its answer names it as ``fork_status_url``)."""
    return f"/api/v1/vms/{source_id}/forks/{snapshot_id}/"


def _fork_request(source: VirtualMachine, snapshot_id: uuid.UUID) -> dict[str, Any] | None:
    """The data of the fork's snapshot request (on the source's own events), or None when the
    snapshot was not taken for a fork of this VM."""
    asked = Event.objects.filter(
        aggregate_type="vm",
        aggregate_id=str(source.pk),
        type=lifecycle.request_verb("snapshot").request_type(),
        data__contains=str(snapshot_id),
    ).order_by("position")
    for event in asked:
        data = event.payload
        if data.get("snapshot_id") == str(snapshot_id) and isinstance(data.get("fork"), dict):
            return {**data, "event_id": str(event.event_id)}
    return None


def status(caller: Caller, source: VirtualMachine, snapshot_id: uuid.UUID) -> dict[str, Any] | None:
    """The fork of ``source`` whose snapshot is ``snapshot_id``: its counts over all its N new
    VMs, and those of them the caller sees; None when there is no such fork. A constant number
    of queries, whatever N."""
    asked = _fork_request(source, snapshot_id)
    if asked is None:
        return None
    vm_ids = [str(i) for i in asked["fork"]["vm_ids"]]
    restore = lifecycle.request_verb("restore")
    rows = {
        str(r["pk"]): r
        for r in VirtualMachine.objects.filter(pk__in=vm_ids).values(
            "pk", "name", "state", "pending_type", "last_error"
        )
    }
    seen = {
        str(pk)
        for pk in policy.visible_vms(caller).filter(pk__in=vm_ids).values_list("pk", flat=True)
    }
    counts = {"running": 0, "failed": 0, "pending": 0, "other": 0}
    vms = []
    for vm_id in vm_ids:
        row = rows.get(vm_id)
        if row is None or row["pending_type"] == restore.requested:
            phase = "pending"
        elif row["state"] == restore.settles_to:
            phase = "running"
        elif row["state"] in lifecycle.BROKEN:
            phase = "failed"
        else:
            phase = "other"
        counts[phase] += 1
        if row is not None and vm_id in seen:
            vms.append(
                {
                    "id": vm_id,
                    "name": row["name"],
                    "state": row["state"],
                    "phase": phase,
                    "last_error": row["last_error"],
                }
            )
    snap = Snapshot.objects.filter(pk=snapshot_id).values("name", "state", "last_error").first()
    return {
        "source": str(source.pk),
        "request_id": asked["event_id"],
        "snapshot": {
            "id": str(snapshot_id),
            **(snap or {"name": asked.get("name", ""), "state": "", "last_error": ""}),
        },
        "count": len(vm_ids),
        **counts,
        "settled": len(vm_ids) - counts["pending"],
        "done": counts["pending"] == 0,
        "vms": vms,
    }
