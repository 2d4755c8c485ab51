"""django-q2 entry points for VM work. Tasks take ids, never model instances."""

from __future__ import annotations

from django.conf import settings

from vms import worker


def enqueue(event_id: str) -> None:
    """Called on commit of a request event."""
    from django_q.tasks import async_task

    async_task(
        "vms.tasks.run_request",
        event_id,
        task_name=f"request-{event_id}",
        timeout=settings.Q_CLUSTER["timeout"],
    )


def run_request(event_id: str) -> str:
    return worker.handle(event_id)


def enqueue_snapshot_cleanup(snapshot_id: str) -> None:
    from django_q.tasks import async_task

    async_task(
        "vms.tasks.cleanup_snapshot", snapshot_id, task_name=f"snapshot-cleanup-{snapshot_id}"
    )


def cleanup_snapshot(snapshot_id: str) -> None:
    worker.cleanup_snapshot(snapshot_id)


def reconcile() -> dict[str, int]:
    from vms.reconcile import reconcile as run

    return run(startup=False)


def apply_retention() -> int:
    from vms.retention import apply_retention as run

    return run()
