"""Starting the pump within a second: the worker's main process asks every second
(``core.ticks``) whether a delivery is due or the log moved past the dispatcher's cursor while
a subscription is active, and if so enqueues ``webhooks.tasks.pump`` — one at a time: the next
only once the previous one finished (or after the longest a pump may take, should it have been
lost). The schedule's minutely pump is the fallback where no worker command runs the ticks.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django_q.tasks import async_task

from audit.events import head
from webhooks.dispatch import pump_timeout_s
from webhooks.models import Delivery, DispatchState, Subscription

__all__ = ["enqueue", "tick", "work_waiting"]

_enqueued_at: datetime | None = None


def work_waiting(now: datetime) -> bool:
    if Delivery.objects.filter(status=Delivery.Status.PENDING, next_attempt_at__lte=now).exists():
        return True
    if not Subscription.objects.filter(active=True).exists():
        return False
    position = DispatchState.objects.filter(pk=1).values_list("position", flat=True).first()
    return head()[0] > (position or 0)


def enqueue() -> None:
    async_task(
        "webhooks.tasks.pump", task_name="webhooks-pump", save=False, timeout=pump_timeout_s()
    )


def tick(now: datetime) -> None:
    global _enqueued_at
    if _enqueued_at is not None:
        finished = (
            DispatchState.objects.filter(pk=1).values_list("pump_finished_at", flat=True).first()
        )
        running = finished is None or finished < _enqueued_at
        if running and now - _enqueued_at < timedelta(seconds=pump_timeout_s()):
            return
    if work_waiting(now):
        enqueue()
        _enqueued_at = now
