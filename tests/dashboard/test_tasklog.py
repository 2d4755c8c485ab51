"""The task log: a row per request folded from the log (progress, outcome, overtaken requests),
the same rows when the projection is rebuilt or back-filled by its migration, who sees which
tasks (an operator sees an admin's request on its VM), filters and keyset pages, the trail reads
they record, and the live pushes of ws/tasks/live/."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.apps import apps
from django.test import Client

from accounts.caller import Caller
from audit import projections
from audit.models import Event
from audit.store import RecordedEvent
from vms import commands
from vms.models import Task, VirtualMachine

from .test_consumers import _json_until


def _running(vm: VirtualMachine) -> VirtualMachine:
    """A VM the log says is running (its start's outcome recorded as the worker would)."""
    caller = Caller.for_user(vm.owner, channel="api")
    request = commands.start(caller, vm).request
    commands.record_outcome(request, "vm.started", {})
    return VirtualMachine.objects.get(pk=vm.pk)


def _task_rows() -> list[tuple[Any, ...]]:
    return list(
        Task.objects.order_by("position").values_list(
            "request_event_id", "verb", "state", "pct", "step", "outcome_type", "error",
            "finished_at", "version", "actor",
        )
    )  # fmt: skip


@pytest.mark.django_db
def test_a_request_its_progress_and_its_outcome_make_one_task(make_user, make_vm) -> None:
    owner, admin = make_user("operator", "opal"), make_user("admin", "ada")
    vm = _running(make_vm(owner))
    stop = commands.stop(Caller.for_user(admin, channel="web"), vm).request
    task = Task.objects.get(request_event_id=stop.event_id)
    assert (task.verb, task.kind, task.state, task.actor, task.channel) == (
        "stop", "request", "pending", "ada", "web",
    )  # fmt: skip
    commands.record_progress(stop, "shutting down", 40, "power button")
    task.refresh_from_db()
    assert (task.pct, task.step, task.message, task.state) == (
        40,
        "shutting down",
        "power button",
        "pending",
    )
    outcome = commands.record_outcome(stop, "vm.stopped", {"graceful": True})
    task.refresh_from_db()
    assert (task.state, task.pct, task.outcome_type, task.version) == (
        "succeeded", 100, "vm.stopped", outcome.position,
    )  # fmt: skip
    assert task.duration_s is not None and task.duration_s >= 0
    # A failure says why.
    start = commands.start(Caller.for_user(owner), VirtualMachine.objects.get(pk=vm.pk)).request
    commands.record_outcome(start, "vm.start_failed", {"error": "no image", "state": "failed"})
    failed = Task.objects.get(request_event_id=start.event_id)
    assert (failed.state, failed.error) == ("failed", "no image")


@pytest.mark.django_db
def test_an_overtaken_request_is_superseded_and_rebuild_and_backfill_agree(
    make_user, make_vm
) -> None:
    owner = make_user("operator", "opal")
    caller = Caller.for_user(owner)
    vm = make_vm(owner)
    start = commands.start(caller, vm).request  # pending: no worker here
    destroy = commands.destroy(caller, VirtualMachine.objects.get(pk=vm.pk)).request
    rows = {t.request_event_id: t for t in Task.objects.all()}
    assert rows[start.event_id].state == "superseded"
    assert rows[start.event_id].finished_at == destroy.recorded_at
    assert rows[destroy.event_id].state == "pending"
    commands.record_outcome(destroy, "vm.destroyed", {})
    other = _running(make_vm(owner, "second"))
    commands.record_progress(commands.stop(caller, other).request, "waiting", 10)
    before = _task_rows()
    assert [r[2] for r in before] == ["superseded", "succeeded", "succeeded", "pending"]
    projections.rebuild("vms.tasks")
    assert _task_rows() == before
    # The migration folds the log it finds the same way.
    migration = importlib.import_module("vms.migrations.0009_task_log")
    Task.objects.all().delete()
    migration.tasks_from_the_log(apps, None)
    assert _task_rows() == before


@pytest.mark.django_db
def test_who_sees_which_tasks_and_the_reads_they_record(make_user, make_vm, token_client) -> None:
    opal, otto = make_user("operator", "opal"), make_user("operator", "otto")
    admin, viewer = make_user("admin", "ada"), make_user("viewer", "vic")
    mine, theirs = _running(make_vm(opal, "mine")), _running(make_vm(otto, "theirs"))
    by_admin = commands.stop(Caller.for_user(admin, channel="web"), mine).request
    commands.stop(Caller.for_user(otto), theirs)

    def ids(user: Any, query: str = "") -> list[str]:
        r = token_client(user).get(f"/api/v1/tasks/{query}")
        assert r.status_code == 200, r.content
        return [t["id"] for t in r.json()["results"]]

    reads = Event.objects.filter(type="audit.trail_read").count
    seen = ids(opal)
    assert by_admin.event_id in seen  # the admin's stop of opal's VM
    assert {t.vm_id for t in Task.objects.filter(request_event_id__in=seen)} == {mine.pk}
    assert len(ids(viewer)) == Task.objects.count()
    # Another's request shown: a trail read naming the positions; one's own only: none.
    before = reads()
    ids(opal)
    read = Event.objects.filter(type="audit.trail_read").order_by("-position").first()
    assert reads() == before + 1 and read.payload["what"] == "api.tasks"
    before = reads()
    assert ids(otto, "?verb=stop") and reads() == before
    # Filters and keyset pages.
    assert ids(viewer, f"?vm={theirs.pk}&verb=start") == [
        t.request_event_id for t in Task.objects.filter(vm=theirs, verb="start")
    ]
    first = token_client(viewer).get("/api/v1/tasks/?limit=2").json()
    rest = token_client(viewer).get(f"/api/v1/tasks/?before={first['next_before']}").json()
    every = [t["id"] for t in first["results"] + rest["results"]]
    assert every == list(
        Task.objects.order_by("-position").values_list("request_event_id", flat=True)
    )
    for bad in ("?verb=fly", "?state=done", "?vm=nope", "?before=-1", "?limit=0"):
        r = token_client(viewer).get(f"/api/v1/tasks/{bad}")
        assert r.status_code == 400, (bad, r.content)


@pytest.mark.django_db
def test_the_page_and_the_home_panel_show_tasks(make_user, make_vm) -> None:
    opal, admin = make_user("operator", "opal"), make_user("admin", "ada")
    vm = _running(make_vm(opal, "panel-vm"))
    commands.stop(Caller.for_user(admin, channel="web"), vm)
    client = Client()
    client.force_login(opal)
    page = client.get("/tasks/").content.decode()
    assert "panel-vm" in page and "ada" in page and "pending" in page
    home = client.get("/").content.decode()
    assert 'id="home-tasks"' in home and "panel-vm" in home
    bad = client.get("/tasks/?state=nope")
    assert bad.status_code == 200 and "state: one of" in bad.content.decode()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("live_stopped")
async def test_an_admins_request_is_pushed_live_to_the_vms_operator(
    make_user, make_vm, ws_connect
) -> None:
    opal = await database_sync_to_async(make_user)("operator", "opal")
    otto = await database_sync_to_async(make_user)("operator", "otto")
    admin = await database_sync_to_async(make_user)("admin", "ada")
    mine = await database_sync_to_async(lambda: _running(make_vm(opal, "mine")))()
    theirs = await database_sync_to_async(lambda: _running(make_vm(otto, "theirs")))()
    comm = await ws_connect("/ws/tasks/live/", opal)
    assert (await comm.connect())[0]

    def stops() -> RecordedEvent:
        commands.stop(Caller.for_user(otto), theirs)  # not opal's: never pushed to opal
        request = commands.stop(Caller.for_user(admin, channel="web"), mine).request
        commands.record_progress(request, "shutting down", 30)
        return request

    request = await database_sync_to_async(stops)()
    pushed = await _json_until(comm, lambda m: m["type"] == "task")
    assert (pushed["task"]["id"], pushed["task"]["actor"]) == (request.event_id, "ada")
    assert pushed["task"]["vm"]["name"] == "mine"
    # The follower sends each task once per batch, as it is then: the request and its progress
    # read in one batch arrive as one message that has the progress already.
    progressed = (
        pushed
        if pushed["task"].get("pct") == 30
        else await _json_until(comm, lambda m: m["task"].get("pct") == 30)
    )
    assert progressed["task"]["step"] == "shutting down"
    await comm.disconnect()
    anon = await ws_connect("/ws/tasks/live/")
    assert (await anon.connect()) == (False, 4401)
    await anon.disconnect()


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_a_request_by_one_user_shows_live_in_anothers_browser(
    make_user, make_vm, web_server, browser
) -> None:
    """The must-show: the operator's Tasks page (and home panel) shows the admin's stop of its VM,
    then its progress, within a second of each append, without a reload."""
    import time

    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.dashboard.pages import log_in

    opal, admin = make_user("operator", "opal"), make_user("admin", "ada")
    vm = _running(make_vm(opal, "watched"))
    pages = []
    for url, live_el in (("/tasks/", "live-status"), ("/", "live-status")):
        driver = browser()
        log_in(driver, web_server.url, opal)
        driver.get(web_server.url + url)
        WebDriverWait(driver, 15).until(
            lambda d, i=live_el: d.find_element(By.ID, i).text == "live"
        )
        driver.execute_script("window.__notReloaded = true")
        pages.append(driver)

    def row_text(driver: Any, task_id: str) -> str:
        rows = driver.find_elements(By.CSS_SELECTOR, f'tr[data-task="{task_id}"]')
        return rows[0].text if rows else ""

    def shown_within(predicate: Any, what: str) -> float:
        started = time.monotonic()
        for driver in pages:
            try:
                WebDriverWait(
                    driver,
                    1.0,
                    poll_frequency=0.02,
                    # A row read while the live script replaces it is stale: read it again.
                    ignored_exceptions=(StaleElementReferenceException,),
                ).until(predicate)
            except Exception:
                raise AssertionError(
                    f"{what}: not shown within 1 s on {driver.current_url}: "
                    f"{row_text(driver, request.event_id)!r}"
                ) from None
        return time.monotonic() - started

    request = commands.stop(Caller.for_user(admin, channel="web"), vm).request
    shown_within(lambda d: "ada" in row_text(d, request.event_id), "the admin's stop")
    assert "watched" in row_text(pages[0], request.event_id)
    commands.record_progress(request, "shutting down", 40)
    shown_within(lambda d: "40%" in row_text(d, request.event_id), "its progress")
    commands.record_outcome(request, "vm.stopped", {"graceful": True, "how": "acpi"})
    shown_within(lambda d: "succeeded" in row_text(d, request.event_id), "its outcome")
    assert all(d.execute_script("return window.__notReloaded === true") for d in pages)
