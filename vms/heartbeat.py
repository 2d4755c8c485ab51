"""The worker cluster's heartbeat, and what ``/readyz`` makes of it.

A live process is not a working cluster: a django-q2 cluster whose pusher died, whose workers
are stuck or whose database connections are broken still has its processes. So the cluster's
main process (``manage.py worker``) sends a heartbeat *task* through the broker every
``SANDBOX_WORKER_HEARTBEAT_S`` seconds, and a worker process that runs it stamps ``beat_at`` in
the ``WorkerHeartbeat`` row of the queue. A heartbeat that made it shows the whole path works:
broker, pusher, a free worker, the worker's database connection. ``/readyz`` is not ready when
no worker took one for ``SANDBOX_WORKER_STALE_S`` seconds. Each heartbeat also records its
host's capacity (``vms.capacity``).

At most one heartbeat is in flight: the next is sent when the previous one was taken, or again
after the stale time, so a stuck cluster does not pile heartbeats up in its queue.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from vms import capacity
from vms.models import WorkerHeartbeat

log = logging.getLogger(__name__)


def queue_name() -> str:
    return str(settings.Q_CLUSTER["name"])


def interval_s() -> float:
    return float(getattr(settings, "SANDBOX_WORKER_HEARTBEAT_S", 10))


def stale_s() -> float:
    return float(getattr(settings, "SANDBOX_WORKER_STALE_S", 90))


def started(started_at: datetime) -> None:
    """A cluster (re)started on this queue: a new row, so an old beat does not count for it."""
    WorkerHeartbeat.objects.update_or_create(
        queue=queue_name(),
        defaults={
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": started_at,
            "sent_at": started_at,
            "beat_at": None,
            "beat_sent_at": None,
        },
    )


def due(last_sent: datetime | None, now: datetime) -> bool:
    """Whether the cluster's main process should send a heartbeat now."""
    if last_sent is None:
        return True
    taken = WorkerHeartbeat.objects.filter(queue=queue_name(), beat_sent_at__gte=last_sent)
    if taken.exists():
        return now - last_sent >= timedelta(seconds=interval_s())
    return now - last_sent >= timedelta(seconds=stale_s())  # lost or stuck: try once more


def send(now: datetime) -> None:
    """Enqueue one heartbeat (the result is not kept: it would crowd out real task results)."""
    from django_q.tasks import async_task

    WorkerHeartbeat.objects.filter(queue=queue_name()).update(sent_at=now)
    async_task(
        "vms.heartbeat.beat",
        queue_name(),
        now.isoformat(),
        task_name="worker-heartbeat",
        save=False,
        timeout=30,
    )


def beat(queue: str, sent_at: str) -> None:
    """The heartbeat task, run by a worker process: it also measures the worker's host
    (``vms.capacity``). A host that cannot be measured keeps its old row; the beat still counts."""
    try:
        capacity.record()
    except (RuntimeError, OSError):
        log.exception("could not measure this host's capacity")
    WorkerHeartbeat.objects.filter(queue=queue).update(
        beat_at=timezone.now(), beat_sent_at=datetime.fromisoformat(sent_at)
    )


def check() -> str:
    """For ``/readyz``: raises when no worker took a heartbeat within the stale time."""
    row = WorkerHeartbeat.objects.filter(queue=queue_name()).first()
    if row is None:
        raise RuntimeError(f"no worker cluster has started on queue {queue_name()!r}")
    now = timezone.now()
    if row.beat_at is None:
        waited = (now - row.started_at).total_seconds()
        if waited > stale_s():
            raise RuntimeError(
                f"the worker cluster started {waited:.0f}s ago (pid {row.pid} on {row.host}) "
                "and no worker has taken a heartbeat task since"
            )
        raise RuntimeError("the worker cluster is starting: no heartbeat taken yet")
    age = (now - row.beat_at).total_seconds()
    if age > stale_s():
        raise RuntimeError(
            f"no worker has taken a heartbeat task for {age:.0f}s (cluster pid {row.pid} on "
            f"{row.host}): the cluster is dead, stuck or busy beyond {stale_s():.0f}s"
        )
    return f"queue {row.queue} on {row.host}: last heartbeat taken {age:.1f}s ago"
