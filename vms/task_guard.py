"""Only the product's own tasks run in the worker.

django-q2 runs whatever dotted path a task names, and its scheduler turns any row of the
schedule table into such a task (unsigned: schedules live in the database, not in the signed
broker payload). Anyone who can write to the database could otherwise run ``os.system`` as the
worker, read the signing keys and rewrite the digest sink. So every worker process checks each
task it takes against ``ALLOWED_TASKS`` before anything of it is imported or called; a refused
task does not run, is recorded as ``system.task_refused`` (the attempt is evidence) and is
stored as a failed task, so the broker does not deliver it again.

The check wraps django-q2's worker function (``install``, done by ``manage.py worker`` before
the cluster starts), so it applies to the cluster's worker processes and to tasks a schedule
asks to run synchronously in the scheduler's process alike.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection
from django.utils import timezone

__all__ = ["ALLOWED_TASKS", "install", "refusal"]

log = logging.getLogger("sandbox.vms.worker")

# Every function the product enqueues (vms.tasks, vms.heartbeat, audit.exports) or schedules
# (audit.apps, vms.apps): a new task must be added here, or the worker refuses it.
ALLOWED_TASKS = frozenset(
    {
        "audit.tasks.run_export",
        "audit.tasks.run_projections",
        "audit.tasks.sign_digest",
        "vms.heartbeat.beat",
        "vms.tasks.apply_retention",
        "vms.tasks.cleanup_snapshot",
        "vms.tasks.reconcile",
        "vms.tasks.run_request",
    }
)


def refusal(task: dict[str, Any]) -> str | None:
    """Why the worker must not run ``task``, or None when it may."""
    func = task.get("func")
    if not isinstance(func, str):
        # The product enqueues by name only; a pickled callable is nobody's task of ours.
        return "the task names its function by object, not by one of the product's names"
    if func not in ALLOWED_TASKS and func not in settings.SANDBOX_WORKER_EXTRA_TASKS:
        return "the function is not one of the product's tasks"
    if task.get("hook"):
        # django-q2 calls a result hook by its dotted path, unchecked: the product sets none.
        return "the task asks for a result hook, which the product never sets"
    return None


def _describe(task: dict[str, Any]) -> dict[str, Any]:
    func = task.get("func")
    return {
        "func": (func if isinstance(func, str) else repr(func))[:300],
        "hook": str(task.get("hook") or "")[:300],
        "task_id": str(task.get("id") or "")[:64],
        "task_name": str(task.get("name") or "")[:200],
        # A schedule's tasks carry its name (or id) as their group.
        "group": str(task.get("group") or "")[:200],
    }


def _refuse(task: dict[str, Any], reason: str) -> None:
    """Record the refusal and turn the task into a failed result that nothing will call."""
    from audit import commands as audit_commands

    data = {**_describe(task), "reason": reason}
    log.error("refused task %s: %s", data["func"], reason)
    if not connection.in_atomic_block:  # a worker process, between tasks
        close_old_connections()
    try:
        audit_commands.record_task_refused(data)
    except DatabaseError:
        log.exception("the refusal of task %s could not be recorded", data["func"])
    task["func"] = data["func"]  # stored as a name, never resolved
    task["hook"] = None  # the monitor would call it when it stores the result
    task["result"] = f"refused by the worker: {reason}"
    task["success"] = False
    task["stopped"] = timezone.now()


class _GuardedQueue:
    """The worker's task queue, with the refused tasks answered instead of handed out."""

    def __init__(self, tasks: Any, results: Any) -> None:
        self._tasks, self._results = tasks, results

    def get(self, *args: Any, **kwargs: Any) -> Any:
        while True:
            task = self._tasks.get(*args, **kwargs)
            if not isinstance(task, dict):
                return task  # "STOP"
            reason = refusal(task)
            if reason is None:
                return task
            _refuse(task, reason)
            self._results.put(task)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tasks, name)


_original_worker: Any = None


def guarded_worker(task_queue: Any, result_queue: Any, timer: Any, *args: Any) -> Any:
    """django-q2's worker, fed only the tasks ``refusal`` lets through."""
    return _original_worker(_GuardedQueue(task_queue, result_queue), result_queue, timer, *args)


def install() -> None:
    """Put ``guarded_worker`` in the place of django-q2's worker (idempotent)."""
    global _original_worker
    from django_q import cluster, worker

    if _original_worker is None:
        _original_worker = worker.worker
    # The cluster spawns its processes with its own reference; the synchronous path
    # (django_q.tasks._sync) looks the worker up in its module at each call.
    worker.worker = guarded_worker
    cluster.worker = guarded_worker  # type: ignore[attr-defined]
