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
asks to run synchronously in the scheduler's process alike. A task package may carry only the
options the product uses (``PACKAGE_KEYS``): a chain, a result hook, a cache or an override of
the cluster's settings is refused and stripped, so the monitor acts on none of them.

Two more ways the database could name a function are closed by ``install`` too: django-q2 calls
the ``hook`` of a stored task row when the monitor saves a result under that row's id and name
(its ``post_save`` receiver ``call_hook``), which ``install`` disconnects (the product sets no
hooks); and the scheduler turns every due schedule row into a task in one transaction, so a
row it cannot handle would stop all the others (the digest signer among them). ``install`` puts
``guarded_scheduler`` in its place: each due schedule is checked first, and one the product
would not have written is recorded as ``system.task_refused`` and disabled (``repeats`` 0),
each in its own transaction, before django-q2's scheduler runs the others.
"""

from __future__ import annotations

import ast
import logging
from typing import Any

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection, transaction
from django.utils import timezone

from audit import commands as audit_commands

__all__ = ["ALLOWED_TASKS", "PACKAGE_KEYS", "install", "refusal", "schedule_refusal"]

log = logging.getLogger("sandbox.vms.worker")

# Every function the product enqueues (vms.tasks, vms.heartbeat, audit.exports, the secrets
# store's rotation, the webhook pump) or schedules (audit.apps, vms.apps, webhooks.apps): a new
# task must be added here, or the worker refuses it.
ALLOWED_TASKS = frozenset(
    {
        "audit.tasks.run_export",
        "audit.tasks.run_projections",
        "audit.tasks.sign_digest",
        "secretstore.tasks.reencrypt",
        "vms.heartbeat.beat",
        "vms.tasks.apply_network",
        "vms.tasks.apply_network_settings",
        "vms.tasks.apply_retention",
        "vms.tasks.cleanup_snapshot",
        "vms.tasks.collect_net_evidence",
        "vms.tasks.expire_lifetimes",
        "vms.tasks.pause_idle_vms",
        "vms.tasks.reconcile",
        "vms.tasks.refill_pools",
        "vms.tasks.relieve_pressure",
        "vms.tasks.rollup_usage",
        "vms.tasks.run_request",
        "vms.tasks.sample_usage",
        "webhooks.tasks.maintain",
        "webhooks.tasks.pump",
    }
)

# The keys of a task package the product makes: async_task's own (id, name, func, args, kwargs,
# started), the options the product passes (save, timeout; group and cluster from the
# scheduler), the cluster's ack_failures setting (ack_failure) and the broker's ack_id. Any
# other (chain, hook, cached, iter_*, sync...) would make the worker or the monitor do what the
# product never asks for.
PACKAGE_KEYS = frozenset(
    {
        "id",
        "name",
        "func",
        "args",
        "kwargs",
        "started",
        "group",
        "cluster",
        "save",
        "timeout",
        "ack_failure",
        "ack_id",
    }
)
# Options a schedule row may give its tasks (in q_options): none of the product's schedules
# gives any (core.schedules); these only place or name the task.
SCHEDULE_OPTIONS = frozenset({"group", "cluster", "timeout"})
# The keywords django-q2's async_task takes as options when given outside q_options.
_OPTION_KEYWORDS = frozenset(
    {
        "hook",
        "group",
        "save",
        "sync",
        "cached",
        "ack_failure",
        "iter_count",
        "iter_cached",
        "chain",
        "broker",
        "cluster",
        "timeout",
        "task_name",
        "q_options",
    }
)


def _allowed_func(func: object) -> bool:
    return isinstance(func, str) and (
        func in ALLOWED_TASKS or func in settings.SANDBOX_WORKER_EXTRA_TASKS
    )


def refusal(task: dict[str, Any]) -> str | None:
    """Why the worker must not run ``task``, or None when it may."""
    func = task.get("func")
    if not isinstance(func, str):
        # The product enqueues by name only; a pickled callable is nobody's task of ours.
        return "the task names its function by object, not by one of the product's names"
    if not _allowed_func(func):
        return "the function is not one of the product's tasks"
    if task.get("hook"):
        # django-q2 calls a result hook by its dotted path, unchecked: the product sets none.
        return "the task asks for a result hook, which the product never sets"
    extra = sorted(str(k) for k in task if k not in PACKAGE_KEYS)
    if extra:
        return "the task carries options the product never sets: " + ", ".join(extra)[:200]
    if "ack_failure" in task and task["ack_failure"] != _ack_failures():
        return "the task overrides the cluster's ack_failures setting"
    return None


def _ack_failures() -> bool:
    return bool(settings.Q_CLUSTER.get("ack_failures", False))


def _ast_retrying(fn: Any, *args: Any) -> Any:
    """``fn`` (``ast.parse`` or ``ast.literal_eval``), tried again on CPython 3.11's spurious
    "AST constructor recursion depth mismatch": the AST builder's depth counter is shared by the
    interpreter's threads, and another thread building an AST at the same moment (a traceback
    being formatted, which parses its source line) trips it (CPython gh-106905)."""
    for _ in range(4):
        try:
            return fn(*args)
        except SystemError as exc:
            if "recursion depth mismatch" not in str(exc):
                raise
            error = exc
    raise error


def _schedule_arguments(s: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The args and kwargs django-q2's scheduler would read from schedule ``s`` (its parsing,
    which may raise where the scheduler would)."""
    kwargs: Any = {}
    if s.kwargs:
        try:
            kwargs = _ast_retrying(ast.literal_eval, s.kwargs)
        except (SyntaxError, ValueError):
            call = _ast_retrying(ast.parse, f"f({s.kwargs})")
            parsed = call.body[0].value.keywords
            kwargs = {k.arg: _ast_retrying(ast.literal_eval, k.value) for k in parsed}
    args: Any = ()
    if s.args:
        args = _ast_retrying(ast.literal_eval, s.args)
        if type(args) is not tuple:
            args = (args,)
    if not isinstance(kwargs, dict):
        raise ValueError("kwargs is not a mapping")
    return args, kwargs


def schedule_refusal(s: Any) -> str | None:
    """Why schedule row ``s`` must not become a task, or None when it may."""
    if not _allowed_func(s.func):
        return "the function is not one of the product's tasks"
    if s.hook:
        return "the schedule asks for a result hook, which the product never sets"
    try:
        _args, kwargs = _schedule_arguments(s)
    except (
        SyntaxError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        MemoryError,
        RecursionError,
    ):
        return "the schedule's arguments cannot be read"
    if s.schedule_type != s.ONCE:
        # The scheduler advances next_run until it passes now: a step that fails or does not
        # move forward (a negative interval) would stop or hang it.
        try:
            step_ok = s.calculate_next_run(s.next_run) > s.next_run
        except Exception:  # whatever django-q2 would raise on this row
            step_ok = False
        if not step_ok:
            return "the schedule's next run cannot be computed"
    q_options = kwargs.get("q_options", {})
    if not isinstance(q_options, dict):
        return "the schedule's q_options is not a mapping"
    extra = sorted(
        {str(k) for k in q_options if k not in SCHEDULE_OPTIONS}
        | {str(k) for k in kwargs if k in _OPTION_KEYWORDS and k != "q_options"}
    )
    if extra:
        return "the schedule asks for options the product never sets: " + ", ".join(extra)[:200]
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
    data = {**_describe(task), "reason": reason}
    log.error("refused task %s: %s", data["func"], reason)
    if not connection.in_atomic_block:  # a worker process, between tasks
        close_old_connections()
    try:
        audit_commands.record_task_refused(data)
    except DatabaseError:
        log.exception("the refusal of task %s could not be recorded", data["func"])
    for key in [k for k in task if k not in PACKAGE_KEYS and k != "sync"]:
        # A chain, cache or hook the monitor would act on. ``sync`` stays: it tells the monitor
        # it runs inside the scheduler's transaction, whose connection it must not close.
        del task[key]
    task["func"] = data["func"]  # stored as a name, never resolved
    task["hook"] = None  # the monitor would call it when it stores the result
    if "ack_failure" in task:
        task["ack_failure"] = _ack_failures()
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
_original_scheduler: Any = None


def _refuse_schedules() -> None:
    """Record and disable each due schedule row the product would not have written."""
    from django_q.conf import Conf
    from django_q.models import Schedule

    due = Schedule.objects.exclude(repeats=0).filter(next_run__lt=timezone.now())
    if Conf.CLUSTER_NAME == Conf.PREFIX:  # as django-q2's scheduler selects them
        due = due.filter(cluster__isnull=True) | due.filter(cluster=Conf.CLUSTER_NAME)
    else:
        due = due.filter(cluster=Conf.CLUSTER_NAME)
    for pk in list(due.values_list("pk", flat=True)):
        try:
            with transaction.atomic(using=Schedule.objects.db):
                s = Schedule.objects.select_for_update().filter(pk=pk).first()
                if s is None or s.repeats == 0:
                    continue
                reason = schedule_refusal(s)
                if reason is None:
                    continue
                data = {
                    "func": str(s.func or "")[:300],
                    "hook": str(s.hook or "")[:300],
                    "task_id": "",
                    "task_name": "",
                    "group": str(s.name or s.pk)[:200],
                    "reason": reason,
                    "schedule_id": s.pk,
                    "schedule_disabled": True,
                }
                log.error("refused schedule %s (%s): %s", data["group"], data["func"], reason)
                audit_commands.record_task_refused(data)
                s.repeats = 0  # the scheduler takes no schedule with no runs left
                s.save(update_fields=["repeats"])
        except DatabaseError:
            log.exception("schedule %s could not be checked", pk)


def guarded_scheduler(broker: Any = None) -> Any:
    """django-q2's scheduler, after the due schedules it must not run are disabled."""
    close_old_connections()
    try:
        _refuse_schedules()
    except DatabaseError:
        log.exception("the due schedules could not be checked")
        return None  # nothing is run unchecked
    return _original_scheduler(broker=broker)


def guarded_worker(task_queue: Any, result_queue: Any, timer: Any, *args: Any) -> Any:
    """django-q2's worker, fed only the tasks ``refusal`` lets through."""
    return _original_worker(_GuardedQueue(task_queue, result_queue), result_queue, timer, *args)


def install() -> None:
    """Put ``guarded_worker`` in the place of django-q2's worker (idempotent)."""
    global _original_worker, _original_scheduler
    from django.db.models.signals import post_save
    from django_q import cluster, scheduler, signals, worker
    from django_q.models import Task

    if _original_worker is None:
        _original_worker = worker.worker
    if _original_scheduler is None:
        _original_scheduler = scheduler.scheduler
    # django-q2 calls the hook named by a stored task row whenever a result is saved under
    # its id and name: the product sets no hooks, so none is ever called.
    post_save.disconnect(signals.call_hook, sender=Task)
    cluster.scheduler = guarded_scheduler  # type: ignore[attr-defined]
    # The cluster spawns its processes with its own reference; the synchronous path
    # (django_q.tasks._sync) looks the worker up in its module at each call.
    worker.worker = guarded_worker
    cluster.worker = guarded_worker  # type: ignore[attr-defined]
