"""The VM list worth living in: sorting by any column, pages that stay fast with thousands of
VMs, start/stop on each row, bulk actions with a review of what will happen VM by VM, and filters
saved in the browser."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from django.test import Client

from accounts.caller import Caller
from audit.models import Event
from vms import commands, views
from vms.models import VirtualMachine


def _client(user: Any) -> Client:
    c = Client()
    c.force_login(user)
    return c


def _names(html: str) -> list[str]:
    return re.findall(r'<tr data-vm-id="[^"]+" data-name="([^"]+)"', html)


def _make(owner: Any, *names: str) -> list[VirtualMachine]:
    caller = Caller.for_user(owner, channel="api")
    return [
        commands.create(caller, name=n, template="linux-small", start_now=False).vm for n in names
    ]


def _running(vm: VirtualMachine) -> None:
    request = commands.start(Caller.for_user(vm.owner), vm).request
    commands.record_outcome(request, "vm.started", {})


@pytest.mark.django_db
def test_sorting_by_a_column_and_pages(make_user, monkeypatch) -> None:
    opal = make_user("operator", "opal")
    _make(opal, "delta", "alpha", "echo", "charlie", "bravo")
    c = _client(opal)
    assert _names(c.get("/vms/").content.decode()) == ["bravo", "charlie", "echo", "alpha", "delta"]
    html = c.get("/vms/?sort=name").content.decode()
    assert _names(html) == ["alpha", "bravo", "charlie", "delta", "echo"]
    assert 'aria-sort="ascending"' in html and "?sort=-name" in html  # clicking again reverses
    assert _names(c.get("/vms/?sort=-name").content.decode())[0] == "echo"
    monkeypatch.setattr(views, "LIST_PAGE", 2)
    first = c.get("/vms/?sort=name").content.decode()
    assert _names(first) == ["alpha", "bravo"] and "VMs 1–2 of 5" in first
    assert "sort=name&amp;page=2" in first
    last = c.get("/vms/?sort=name&page=3").content.decode()
    assert _names(last) == ["echo"] and 'rel="prev"' in last and 'rel="next"' not in last
    assert _names(c.get("/vms/?sort=name&page=99").content.decode()) == ["echo"]  # the last page
    assert c.get("/vms/?sort=nonsense").status_code == 200  # an unknown key falls back


@pytest.mark.django_db
def test_row_buttons_offer_what_the_state_allows_and_come_back_to_the_list(make_user) -> None:
    opal = make_user("operator", "opal")
    stopped, running = _make(opal, "stopped-one", "running-one")
    _running(running)
    c = _client(opal)
    html = c.get("/vms/?sort=name").content.decode()
    row = {
        n: re.search(rf'data-name="{n}".*?</tr>', html, re.S).group(0)
        for n in ("stopped-one", "running-one")
    }
    assert (
        'data-verb="start"' in row["stopped-one"] and 'data-verb="stop"' not in row["stopped-one"]
    )
    assert (
        'data-verb="stop"' in row["running-one"] and 'data-verb="start"' not in row["running-one"]
    )
    r = c.post(f"/vms/{stopped.pk}/start/", {"next": "/vms/?sort=name"})
    assert (r.status_code, r["Location"]) == (302, "/vms/?sort=name")
    assert VirtualMachine.objects.get(pk=stopped.pk).pending_type == "vm.start_requested"
    r = c.post(f"/vms/{running.pk}/stop/", {"next": "https://evil.example/vms/"})
    assert r["Location"] == f"/vms/{running.pk}/"  # never off the site


@pytest.mark.django_db
def test_bulk_actions_review_then_do_only_what_may_be_done(make_user) -> None:
    opal, otto = make_user("operator", "opal"), make_user("operator", "otto")
    a, b, c_vm = _make(opal, "a", "b", "c")
    (theirs,) = _make(otto, "theirs")
    _running(c_vm)
    c = _client(opal)
    before = Event.objects.count()
    ids = [str(a.pk), str(b.pk), str(c_vm.pk), str(theirs.pk)]
    review = c.post("/vms/bulk/", {"verb": "start", "ids": ids})
    html = review.content.decode()
    assert review.status_code == 200 and 'id="bulk-confirm"' in html
    plan = dict(re.findall(r'<tr data-vm-id="([^"]+)">(.*?)</tr>', html, re.S))
    assert "<b>start" in plan[str(a.pk)] and "<b>start" in plan[str(b.pk)]
    assert "skipped: it is running" in plan[str(c_vm.pk)]
    assert "skipped: no such VM" in plan[str(theirs.pk)]  # another's VM is not named
    assert "theirs" not in html
    assert Event.objects.count() == before  # the review changes nothing
    done = c.post("/vms/bulk/", {"verb": "start", "ids": ids, "confirm": "on"}, follow=True)
    assert "Start requested for 2: a, b." in done.content.decode()
    pending = dict(VirtualMachine.objects.values_list("name", "pending_type"))
    assert pending["a"] == pending["b"] == "vm.start_requested"
    assert not pending["c"] and not pending["theirs"]
    # Bad input: a clear message, nothing done.
    before = Event.objects.count()
    for body in ({"verb": "start"}, {"verb": "fly", "ids": ids}, {"verb": "stop", "ids": ["x"]}):
        r = c.post("/vms/bulk/", body, follow=True)
        assert "Bulk action refused" in r.content.decode(), body
    assert Event.objects.count() == before
    # A viewer has no bulk bar and may not post one.
    viewer = _client(make_user("viewer", "vic"))
    before = Event.objects.count()
    assert 'id="bulk-form"' in viewer.get("/vms/").content.decode()
    assert 'id="tick-all"' not in viewer.get("/vms/").content.decode()
    r = viewer.post(
        "/vms/bulk/", {"verb": "stop", "ids": [str(a.pk)], "confirm": "on"}, follow=True
    )
    assert "Nothing to stop" in r.content.decode()
    assert VirtualMachine.objects.get(pk=a.pk).pending_type == "vm.start_requested"
    assert Event.objects.count() == before


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_ticks_review_and_saved_filters_in_the_browser(make_user, web_server, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.dashboard.pages import log_in

    opal = make_user("operator", "opal")
    _make(opal, "web-a", "web-b", "db-a")
    driver = browser()
    log_in(driver, web_server.url, opal)
    driver.get(f"{web_server.url}/vms/?q=web")
    WebDriverWait(driver, 15).until(lambda d: d.find_element(By.ID, "live-status").text == "live")
    count = driver.find_element(By.ID, "bulk-count")
    assert count.text == "none ticked"
    assert not driver.find_element(By.ID, "bulk-review").is_enabled()
    driver.find_element(By.ID, "tick-all").click()
    assert count.text == "2 ticked"
    driver.find_element(By.ID, "bulk-review").click()
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.ID, "bulk-plan"))
    plan = driver.find_element(By.ID, "bulk-plan").text
    assert "web-a" in plan and "web-b" in plan and "db-a" not in plan
    driver.find_element(By.ID, "bulk-confirm").click()
    WebDriverWait(driver, 10).until(lambda d: "Start requested for 2" in d.page_source)
    # A state that changes while the list is open is said in its live region (screen readers).
    WebDriverWait(driver, 15).until(lambda d: d.find_element(By.ID, "live-status").text == "live")
    web_a = VirtualMachine.objects.get(name="web-a")
    from vms.worker import load_request

    start = Event.objects.filter(aggregate_id=str(web_a.pk), type="vm.start_requested").last()
    commands.record_outcome(load_request(str(start.event_id)), "vm.started", {})
    announcer = driver.find_element(By.ID, "vm-announce")
    assert announcer.get_attribute("aria-live") == "polite"
    WebDriverWait(driver, 10).until(
        lambda d: "web-a is running" in announcer.get_attribute("textContent")
    )
    # Save the filter; it is offered again on the next visit, in this browser.
    driver.get(f"{web_server.url}/vms/?q=web")
    driver.find_element(By.ID, "save-filter").click()
    alert = driver.switch_to.alert
    alert.send_keys("web boxes")
    alert.accept()
    driver.get(f"{web_server.url}/vms/")
    link = WebDriverWait(driver, 10).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#saved-filters a.saved-filter")
    )
    assert link.text == "web boxes"
    link.click()
    WebDriverWait(driver, 10).until(lambda d: "q=web" in d.current_url)
    names = [
        r.get_attribute("data-name")
        for r in driver.find_elements(By.CSS_SELECTOR, "tr[data-vm-id]")
    ]
    assert sorted(names) == ["web-a", "web-b"]


# --- Live columns: CPU, memory used and uptime of the live VMs on the page ----------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("live_stopped")
async def test_the_list_socket_sends_the_metrics_of_the_live_vms_asked_for(
    make_user, make_vm, ws_connect, monkeypatch
) -> None:
    """The page asks for its live VMs' metrics: input that is not a watch is answered with an
    error and changes nothing, a VM of another user (or a stopped one) is left out, and the
    samples come batched, one frame for the page."""
    from channels.db import database_sync_to_async

    from vms import consumers

    from .test_consumers import _json_until

    monkeypatch.setattr(consumers, "LIST_METRICS_S", 0.2)
    opal = await database_sync_to_async(make_user)("operator", "opal")
    otto = await database_sync_to_async(make_user)("operator", "otto")

    def vms() -> tuple[VirtualMachine, VirtualMachine, VirtualMachine]:
        mine, stopped, theirs = make_vm(opal, "mine"), make_vm(opal, "idle"), make_vm(otto, "x")
        _running(mine)
        _running(theirs)
        return mine, stopped, theirs

    mine, stopped, theirs = await database_sync_to_async(vms)()
    comm = await ws_connect("/ws/vms/live/", opal)
    assert (await comm.connect())[0]
    for bad in ("nonsense", '{"type": "watch", "vms": "all"}', '{"type": "watch", "vms": [1]}',
                '{"type": "watch", "vms": [' + ",".join(['"a"'] * 101) + "]}"):  # fmt: skip
        await comm.send_to(text_data=bad)
        error = await _json_until(comm, lambda m: m["type"] == "error")
        assert "watch" in error["detail"]
    await comm.send_to(
        text_data=json.dumps({"type": "watch", "vms": [str(v.pk) for v in (mine, stopped, theirs)]})
    )
    batch = await _json_until(comm, lambda m: m["type"] == "metrics")
    assert set(batch["samples"]) == {str(mine.pk)}  # not the stopped one, nor otto's
    sample = batch["samples"][str(mine.pk)]
    assert sample["state"] == "running"
    assert set(sample) == {"state", "cpu_percent", "memory_used_bytes", "rss_bytes", "uptime_s"}
    await comm.send_to(text_data=json.dumps({"type": "watch", "vms": []}))  # nothing watched
    await comm.disconnect()


def test_the_list_columns_of_a_sample() -> None:
    from vms.consumers import list_metrics

    health = {"uptime_s": 75.5, "memory_kib": {"total": 1000, "available": 250}}
    row = list_metrics({"state": "running", "cpu_percent": 12.5, "rss_bytes": 9, "health": health})
    assert row == {
        "state": "running",
        "cpu_percent": 12.5,
        "memory_used_bytes": 750 * 1024,
        "rss_bytes": 9,
        "uptime_s": 75.5,
    }
    bare = list_metrics({"state": "paused", "cpu_percent": None, "rss_bytes": None, "health": None})
    assert bare["memory_used_bytes"] is None and bare["uptime_s"] is None
