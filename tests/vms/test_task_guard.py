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

from tests.astutil import parse
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
    from django_q.models import Schedule

    # Refused before the scheduler made tasks of them: disabled, and the event says so.
    assert all(r["schedule_disabled"] is True for r in (by_group["x"], by_group["y"]))
    assert set(Schedule.objects.filter(name__in=["x", "y"]).values_list("repeats", flat=True)) == {
        0
    }
    log = (tmp_path / "worker.log").read_text()
    assert "refused schedule x (os.system)" in log


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
        for node in ast.walk(parse(source)):
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


@pytest.fixture
def guard_installed(monkeypatch):
    """``task_guard.install()`` in this process, undone afterwards (the modules it patches and
    django-q2's hook receiver it disconnects)."""
    import django_q.cluster
    import django_q.scheduler
    import django_q.worker
    from django.db.models.signals import post_save
    from django_q.models import Task
    from django_q.signals import call_hook

    monkeypatch.setattr(django_q.worker, "worker", django_q.worker.worker)
    monkeypatch.setattr(django_q.cluster, "worker", django_q.cluster.worker)
    monkeypatch.setattr(django_q.cluster, "scheduler", django_q.cluster.scheduler)
    task_guard.install()
    yield
    post_save.connect(call_hook, sender=Task)


def test_a_hook_stored_on_a_task_row_is_never_called(db, guard_installed) -> None:
    """Review F3: django-q2 calls the ``hook`` of a stored task row (a post_save receiver)
    when the monitor saves a result under the same id and name, which a schedule can choose."""
    from django.utils import timezone
    from django_q.models import Task
    from django_q.monitor import save_task

    now = timezone.now()
    Task.objects.create(
        id="f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3",
        name="x-chosen",
        func="vms.tasks.reconcile",
        hook="sys.exit",  # would kill the monitor
        started=now,
        stopped=now,
        success=False,
    )
    pkg = {
        "id": "f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3",
        "name": "x-chosen",
        "func": "os.system",
        "args": ("id",),
        "kwargs": {},
        "started": now,
        "group": "g",
        "sync": True,  # the monitor keeps the test's connection open
    }
    reason = task_guard.refusal(pkg)
    assert reason is not None
    task_guard._refuse(pkg, reason)
    save_task(pkg, None)  # raised SystemExit through the hook
    stored = Task.objects.get(id=pkg["id"])
    assert stored.attempt_count == 1 and "refused by the worker" in str(stored.result)


def test_a_task_with_options_the_product_never_sets_is_refused_and_stripped(db) -> None:
    base = {"id": "1", "name": "a", "func": "vms.tasks.reconcile", "args": (), "kwargs": {}}
    assert task_guard.refusal(dict(base, group="g", save=False, timeout=30)) is None
    for extra in (
        {"chain": [("os.system", ("true",), {})]},
        {"cached": True},
        {"iter_count": 2},
        {"sync": True},
        {"ack_failure": False},  # the cluster acknowledges failures
    ):
        task = dict(base, **extra)
        reason = task_guard.refusal(task)
        assert reason is not None, extra
        task_guard._refuse(task, reason)
        assert not {"chain", "cached", "iter_count"} & set(task), task
        assert task.get("ack_failure", True) is True


def test_a_synchronous_schedule_with_a_chain_neither_runs_nor_raises(db, guard_installed, tmp_path):
    """Review F4: the chain's package raised KeyError 'cached' in the monitor, which rolled
    back the scheduler's whole transaction at every tick."""
    from django_q.models import Task
    from django_q.tasks import async_task

    pwned = tmp_path / "pwned-chain"
    async_task(
        "vms.tasks.reconcile",
        q_options={"sync": True, "chain": [("os.system", (f"touch {pwned}",), {})]},
    )
    assert not pwned.exists()
    (refused,) = _refusals()
    assert "chain" in refused["reason"]
    assert Task.objects.get(func="vms.tasks.reconcile").success is False


@pytest.mark.parametrize(
    "row",
    [
        {"func": "vms.tasks.reconcile", "kwargs": "q_options={'chain': []}"},
        {"func": "vms.tasks.reconcile", "kwargs": "chain=[('os.system', ('id',), {})]"},
        {"func": "vms.tasks.reconcile", "kwargs": "task_name='x-chosen'"},
        {"func": "vms.tasks.reconcile", "kwargs": "q_options={'hook': 'os.system'}"},
        {"func": "vms.tasks.reconcile", "args": "("},
        {"func": "vms.tasks.reconcile", "kwargs": "q_options=[1]"},
        {"func": "vms.tasks.reconcile", "hook": "os.system"},
        {"func": "os.system", "args": "'id'"},
        {"func": "vms.tasks.reconcile", "schedule_type": "I", "minutes": -1},  # would hang it
        {"func": "vms.tasks.reconcile", "schedule_type": "C", "cron": "not a cron"},
        {"func": "vms.tasks.reconcile", "schedule_type": "?"},
    ],
)
def test_a_schedule_row_the_product_would_not_write_is_refused(db, row) -> None:
    from django_q.models import Schedule

    assert task_guard.schedule_refusal(Schedule(**row)) is not None
    ours = Schedule(func="vms.tasks.reconcile", kwargs="q_options={'group': 'g'}")
    assert task_guard.schedule_refusal(ours) is None
    every = Schedule(func="audit.tasks.sign_digest", schedule_type="I", minutes=1)
    assert task_guard.schedule_refusal(every) is None


@pytest.mark.django_db(transaction=True)
def test_a_bad_schedule_row_does_not_stop_the_digest_signer(worker_env, tmp_path) -> None:
    """Review F4, with a real worker: rows the scheduler could not turn into tasks (a chain,
    unreadable arguments) stopped every schedule, the digest signer's among them, with no
    event. They are refused (recorded, disabled) and the others run."""
    from django_q.models import Schedule, Success

    from audit.apps import ensure_schedules

    pwned = tmp_path / "pwned-chain"
    # Written before the product's schedules, so that the scheduler meets them first.
    Schedule.objects.create(
        name="bad-chain",
        func="vms.tasks.reconcile",
        kwargs=f"q_options={{'sync': True, 'chain': [('os.system', ('touch {pwned}',), {{}})]}}",
        schedule_type="O",
        repeats=1,
    )
    Schedule.objects.create(
        name="bad-args", func="vms.tasks.reconcile", args="(", schedule_type="I", minutes=1
    )
    ensure_schedules()
    w = Worker(worker_env, tmp_path / "worker.log")
    w.start()
    try:

        def signed() -> bool:
            return Success.objects.filter(
                func="audit.tasks.sign_digest", group="audit.sign_digest"
            ).exists()

        wait_for(signed, 120, "the scheduled digest signer to run")
    finally:
        w.stop()
    refused = {r["group"]: r for r in _refusals()}
    assert "chain" in refused["bad-chain"]["reason"]
    assert "cannot be read" in refused["bad-args"]["reason"]
    assert all(r["schedule_disabled"] for r in refused.values())
    assert set(
        Schedule.objects.filter(name__in=["bad-chain", "bad-args"]).values_list(
            "repeats", flat=True
        )
    ) == {0}
    assert not pwned.exists()


def test_qcluster_refuses_and_names_the_worker() -> None:
    """``manage.py qcluster`` would run django-q2's cluster without the task guard."""
    from django.core.management import CommandError, call_command, get_commands

    assert get_commands()["qcluster"] == "vms.shell"
    with pytest.raises(CommandError, match="manage.py worker"):
        call_command("qcluster", "--run-once")
