"""The worker runs only the product's own tasks (``vms.task_guard``).

Filed: a row written into django-q2's schedule table (by SQL, or through the Django admin's
schedule form) naming ``os.system`` ran its command as the worker within a minute, with no
event; the worker could read the signing keys and rewrite the digest sink."""

from __future__ import annotations

import ast
import json
import re

import pytest
from django.db import connection
from django.test import Client

from tests.vms.conftest import ROOT, Worker, wait_for
from vms import task_guard


def _refusals() -> list[dict]:
    from audit.models import Event

    return [
        json.loads(d)
        for d in Event.objects.filter(type="system.task_refused").values_list("data", flat=True)
    ]


@pytest.mark.django_db(transaction=True)
def test_a_schedule_written_into_the_database_does_not_run_a_foreign_function(
    worker_env, tmp_path
) -> None:
    pwned = tmp_path / "pwned"
    now = "CURRENT_TIMESTAMP" if connection.vendor == "postgresql" else "datetime('now')"
    with connection.cursor() as cur:
        # As the reviewer did: straight into the table, as anyone with the database's
        # credentials could.
        cur.execute(
            "INSERT INTO django_q_schedule (func, args, schedule_type, repeats, next_run, name, "
            f"minutes) VALUES (%s, %s, 'O', -1, {now}, 'x', NULL)",
            ["os.system", repr(f"id > {pwned}")],
        )
        # An allowed function with a result hook that would run a command of its own.
        cur.execute(
            "INSERT INTO django_q_schedule (func, hook, schedule_type, repeats, next_run, name, "
            f"minutes) VALUES (%s, %s, 'O', -1, {now}, 'y', NULL)",
            ["vms.tasks.reconcile", "os.system"],
        )
    w = Worker(worker_env, tmp_path / "worker.log")
    w.start()
    try:

        def both_refused() -> list[dict] | None:
            found = _refusals()
            return found if {r["group"] for r in found} >= {"x", "y"} else None

        refused = wait_for(both_refused, 90, "the worker to refuse the two schedules")
    finally:
        w.stop()
    by_group = {r["group"]: r for r in refused}
    assert by_group["x"]["func"] == "os.system"
    assert "not one of the product's tasks" in by_group["x"]["reason"]
    assert by_group["y"]["hook"] == "os.system"
    assert not pwned.exists(), "the scheduled command ran"
    from django_q.models import Failure

    failed = {f.func: f for f in Failure.objects.all()}
    assert "refused by the worker" in str(failed["os.system"].result)
    log = (tmp_path / "worker.log").read_text()
    assert "refused task os.system" in log


def test_a_refused_task_is_answered_without_being_handed_to_the_worker(db) -> None:
    """The queue the worker reads hands out the allowed task and answers the refused ones."""
    import queue

    tasks: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()
    foreign = {"id": "1", "name": "a", "func": "os.system", "args": ("true",), "kwargs": {}}
    pickled = {"id": "2", "name": "b", "func": print, "args": (), "kwargs": {}}
    ours = {"id": "3", "name": "c", "func": "vms.tasks.reconcile", "args": (), "kwargs": {}}
    for t in (foreign, pickled, ours, "STOP"):
        tasks.put(t)
    guarded = task_guard._GuardedQueue(tasks, results)
    assert guarded.get() is ours
    assert guarded.get() == "STOP"
    answered = [results.get_nowait(), results.get_nowait()]
    assert [a["id"] for a in answered] == ["1", "2"]
    assert all(a["success"] is False and a["hook"] is None for a in answered)
    assert all(isinstance(a["func"], str) for a in answered)
    assert [r["task_id"] for r in _refusals()] == ["1", "2"]


@pytest.mark.django_db
def test_every_task_the_product_schedules_or_enqueues_is_allowed() -> None:
    from django_q.models import Schedule

    from audit.apps import ensure_schedules as audit_schedules
    from vms.apps import ensure_schedules as vms_schedules

    audit_schedules()
    vms_schedules()
    scheduled = set(Schedule.objects.values_list("func", flat=True))
    assert scheduled and scheduled <= task_guard.ALLOWED_TASKS
    enqueued: set[str] = set()
    for path in ROOT.glob("*/**/*.py"):
        if path.parts[len(ROOT.parts)] in ("tests", "bench", "var", "sdk", "images") or (
            ".venv" in path.parts
        ):
            continue
        source = path.read_text()
        if "async_task" not in source:
            continue
        for node in ast.walk(ast.parse(source)):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", "")) == "async_task"
            ):
                first = node.args[0]
                assert isinstance(first, ast.Constant), f"{path}: enqueue a task by its name"
                enqueued.add(first.value)
    assert enqueued and enqueued <= task_guard.ALLOWED_TASKS, enqueued - task_guard.ALLOWED_TASKS


def test_the_admin_offers_no_way_to_add_change_or_resubmit_worker_tasks(make_user) -> None:
    from django_q.models import Schedule

    Schedule.objects.create(name="s", func="vms.tasks.reconcile", schedule_type="I", minutes=1)
    schedule = Schedule.objects.get(name="s")
    client = Client()
    client.force_login(make_user("admin", "boss"))
    assert client.get("/admin/django_q/schedule/").status_code == 200  # still readable
    assert client.get("/admin/django_q/schedule/add/").status_code == 403
    response = client.post(
        "/admin/django_q/schedule/add/",
        {"func": "os.system", "args": "'id'", "schedule_type": "O", "repeats": -1, "name": "z"},
    )
    assert response.status_code == 403
    response = client.post(
        f"/admin/django_q/schedule/{schedule.pk}/change/",
        {"func": "os.system", "name": "s", "schedule_type": "I", "minutes": 1, "repeats": -1},
    )
    assert response.status_code == 403
    assert Schedule.objects.get(pk=schedule.pk).func == "vms.tasks.reconcile"
    assert not Schedule.objects.filter(name="z").exists()
    for model in ("success", "failure"):
        page = client.get(f"/admin/django_q/{model}/")
        assert page.status_code == 200
        assert re.search(rb'name="action"', page.content) is None, "a resubmit action is offered"


def test_a_schedule_that_asks_to_run_synchronously_is_refused_too(db, tmp_path, monkeypatch):
    """A schedule's q_options may ask for ``sync``: django-q2 then runs the task in the
    scheduler's own process, through the same (guarded) worker function."""
    import django_q.cluster
    import django_q.worker
    from django_q.tasks import async_task

    monkeypatch.setattr(django_q.worker, "worker", django_q.worker.worker)
    monkeypatch.setattr(django_q.cluster, "worker", django_q.cluster.worker)
    task_guard.install()
    pwned = tmp_path / "pwned-sync"
    async_task("os.system", f"touch {pwned}", sync=True)
    assert not pwned.exists()
    assert [r["func"] for r in _refusals()] == ["os.system"]


def test_only_the_environment_can_allow_another_function(settings) -> None:
    task = {"id": "1", "name": "a", "func": "time.sleep", "args": (1,), "kwargs": {}}
    assert task_guard.refusal(task) is not None
    settings.SANDBOX_WORKER_EXTRA_TASKS = ["time.sleep"]
    assert task_guard.refusal(task) is None
    assert task_guard.refusal(dict(task, func="os.system")) is not None
