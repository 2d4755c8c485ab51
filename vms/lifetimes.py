"""VM lifetimes: a VM given one (at create, from its template, or later: ``commands.set_lifetime``)
is stopped or destroyed when it ends, by the ordinary request of the lifecycle table, asked by
the system with the reason in its data (``{"reason": "lifetime", "expired_at": ...}``).

The worker's main process looks every second (``core.ticks``): one query on the indexed
``expires_at`` of the VMs that have one; when an end has come it enqueues ``expire``, which asks
each ended VM's request through ``commands.expire_lifetime`` (under the event store's lock, so a
second run finds the end already asked for and does nothing).
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta

from django.utils import timezone

from vms import commands, lifecycle
from vms.models import VirtualMachine

__all__ = ["BATCH", "due", "expire", "tick"]

log = logging.getLogger("sandbox.lifetimes")

BATCH = 100  # VMs a run takes; the next tick finds the rest
# While an enqueued run may still be waiting for a worker, the tick does not enqueue another.
_RUN_S = 10
_enqueued_at: datetime | None = None


def due(now: datetime, limit: int = BATCH) -> list[uuid.UUID]:
    """The VMs whose lifetime has ended by ``now`` (oldest end first)."""
    return list(
        VirtualMachine.objects.filter(expires_at__lte=now)
        .exclude(state=lifecycle.GONE)
        .order_by("expires_at")
        .values_list("pk", flat=True)[:limit]
    )


def expire(now: datetime | None = None) -> int:
    """Ask the end of every VM whose lifetime has ended: the number of events appended."""
    now = now or timezone.now()
    done = 0
    for vm_id in due(now):
        try:
            if commands.expire_lifetime(vm_id, now) is not None:
                done += 1
        except Exception:
            # One VM's failure (a conflict with a concurrent request) leaves it to the next run.
            log.warning("lifetime of VM %s: not acted on", vm_id, exc_info=True)
    return done


def tick(now: datetime) -> None:
    """``core.ticks``: enqueue ``expire`` when a VM's lifetime has ended (not again while one
    just enqueued may still be waiting)."""
    global _enqueued_at
    if _enqueued_at is not None and now - _enqueued_at < timedelta(seconds=_RUN_S):
        return
    if not due(now, limit=1):
        return
    from django_q.tasks import async_task

    async_task(
        "vms.tasks.expire_lifetimes", task_name="vm-lifetimes", save=False, timeout=_RUN_S * 2
    )
    _enqueued_at = now
