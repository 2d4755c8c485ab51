"""Every page of the dashboard, as each role, in headless Chromium at 1280 and 390 px wide (light,
and dark at 390): no page scrolls sideways, and axe-core finds no serious or critical violation
(an unlabelled form control, text below 4.5:1 contrast, ...). The pages are found from the URL
conf, so a page added later is checked without touching this test. Screenshots go to
artifacts/dashboard/pages/."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.dashboard.conftest import ARTIFACTS
from tests.dashboard.pages import (
    AXE,
    axe_violations,
    discover,
    horizontal_overflow,
    log_in,
    unlabelled_controls,
)
from tests.dashboard.pages import viewport as set_viewport

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PASSES = ((1280, False), (390, False), (390, True))  # (width, dark)


@pytest.fixture
def site(make_user, make_vm, settings) -> dict[str, Any]:
    """One user of each role, an operator's VM (with its events), an operator's webhook (with a
    failed and a delivered attempt), and the candidates that fill the URL conf's parameters."""
    from accounts.caller import Caller
    from audit import exports
    from audit.actor import Actor
    from audit.models import Event
    from vms import commands
    from vms.models import Network
    from webhooks import commands as webhooks
    from webhooks.models import Delivery, DeliveryAttempt

    users = {
        role: make_user(role, f"{role}-amy") for role in ("admin", "operator", "viewer", "auditor")
    }
    vm = make_vm(users["operator"], name="page-vm")
    # An audit bundle, for the export's page.
    now = datetime.now(UTC)
    period = {"since": (now - timedelta(hours=1)).isoformat(), "until": now.isoformat()}
    request = exports.clean_request("bundle", period)
    job = exports.request_export(
        Actor.system(channel="shell", name="tests"), users["auditor"], request
    )
    # A console session (its recording is not on this server: the replay page says so).
    watcher = Actor.system(channel="dashboard", name="tests")
    opened = commands.record_console_opened(
        watcher, str(vm.pk), {"session": "s1", "mode": "viewer"}
    )
    closed = {"session": "s1", "recording": "gone.cast", "size": 0, "sha256": "", "duration_s": 1}
    commands.record_console_closed(watcher, str(vm.pk), opened.event_id, closed)
    # A webhook of the operator's (to a local port nobody serves: no pump runs here), its ping
    # delivered at the second attempt.
    settings.SANDBOX_WEBHOOK_ALLOW_PRIVATE = True
    hook = webhooks.subscribe(
        Caller.for_user(users["operator"]), url="http://127.0.0.1:9/sandbox?token=x",
        event_types=["vm.*"], description="page hook",
    ).subscription  # fmt: skip
    ping = webhooks.ping(Caller.for_user(users["operator"]), hook)
    delivery = Delivery.objects.create(
        subscription=hook, event_position=ping.position, event_id=ping.event_id,
        event_type=ping.type, status="delivered", attempts=2, created_at=now, finished_at=now,
        last_status_code=200,
    )  # fmt: skip
    DeliveryAttempt.objects.create(
        delivery=delivery, number=1, started_at=now, duration_ms=31, address="203.0.113.7",
        status_code=500, error="HTTP 500", response_excerpt="oops", next_retry_at=now,
    )  # fmt: skip
    DeliveryAttempt.objects.create(
        delivery=delivery, number=2, started_at=now, duration_ms=12, address="203.0.113.7",
        status_code=200, response_excerpt="ok",
    )  # fmt: skip
    # A running VM of the operator's, forked into two (one restored, one pending): its fork's
    # progress page; its id and the fork's snapshot come first among the candidates.
    started = commands.create(
        Caller.for_user(users["operator"]), name="fork-src", template="linux-small"
    )
    commands.record_outcome(started.request, "vm.started", {"host": "h1", "hypervisor": "qemu"})
    forked = commands.fork(Caller.for_user(users["operator"]), started.vm, count=2)
    commands.record_outcome(
        forked.vms[0].request, "vm.restored", {"host": "h1", "hypervisor": "qemu"}
    )
    fork_ids = [str(started.vm_id), str(forked.snapshot.pk)]
    # The VM's network (the first create makes the default one) and any other.
    uuids = [
        *fork_ids,
        str(vm.pk),
        str(job.pk),
        str(hook.pk),
        *(str(n.pk) for n in Network.objects.all()),
    ]
    last = Event.objects.filter(aggregate_id=str(vm.pk)).order_by("-position").first()
    assert last is not None
    ints = [str(last.position), *(str(u.pk) for u in users.values())]
    # A host's name (its page answers for any well-formed name).
    strs = ["page-host"]
    return {"users": users, "vm": vm, "candidates": {"uuid": uuids, "int": ints, "str": strs}}


# What each role must reach (so that a discovery that finds nothing cannot pass).
MUST_SEE = {
    "admin": [
        "/", "/vms/", "/vms/<uuid:pk>/", "/vms/new/", "/vms/hosts/", "/vms/hosts/<str:name>/", "/accounts/users/", "/accounts/tokens/", "/audit/",
        "/networks/", "/networks/<uuid:pk>/edit/", "/tasks/", "/webhooks/", "/webhooks/<uuid:pk>/",
        "/vms/quotas/", "/vms/pools/", "/vms/<uuid:pk>/forks/<uuid:snapshot_pk>/",
    ],
    "operator": [
        "/", "/vms/", "/vms/<uuid:pk>/", "/vms/new/", "/accounts/tokens/", "/networks/", "/tasks/",
        "/webhooks/", "/webhooks/<uuid:pk>/", "/webhooks/<uuid:pk>/delete/",
        "/vms/<uuid:pk>/forks/<uuid:snapshot_pk>/",
    ],
    "viewer": ["/", "/vms/", "/vms/<uuid:pk>/", "/accounts/tokens/", "/networks/", "/tasks/"],
    "auditor": [
        "/", "/vms/<uuid:pk>/", "/audit/", "/audit/events/<int:position>/", "/audit/sessions/",
        "/audit/exports/<uuid:pk>/", "/audit/sessions/<int:position>/replay/", "/webhooks/",
        "/webhooks/<uuid:pk>/",
    ],
}  # fmt: skip


def wait_loaded(driver: Any) -> None:
    deadline = time.monotonic() + 10
    while driver.execute_script("return document.readyState") != "complete":
        assert time.monotonic() < deadline, f"{driver.current_url} never finished loading"
        time.sleep(0.05)
    time.sleep(0.3)  # the modules' first render and the live socket's status


@pytest.mark.parametrize("role", ["admin", "operator", "viewer", "auditor"])
def test_every_page_fits_and_passes_axe(role, site, web_server, browser) -> None:
    from django.test import Client

    assert AXE.exists(), f"{AXE} is missing: cd frontend && npm ci"
    user = site["users"][role]
    client = Client()
    client.force_login(user)
    pages = discover(client, site["candidates"])
    found = {p.route for p in pages}
    missing = [r for r in MUST_SEE[role] if r not in found]
    assert not missing, f"{role} reached {sorted(found)}, not {missing}"
    urls = [p.url for p in pages]
    # The error pages this user meets: a page that is not there, one they may not see.
    urls.append("/no-such-page/")
    if role != "admin":
        assert client.get("/accounts/users/").status_code == 403
        urls.append("/accounts/users/")

    driver = browser()
    log_in(driver, web_server.url, user)
    out = ARTIFACTS / "pages"
    out.mkdir(parents=True, exist_ok=True)
    failures = []
    for width, dark in PASSES:
        set_viewport(driver, width, dark=dark)
        for url in urls:
            driver.get(web_server.url + url)
            wait_loaded(driver)
            where = f"{url} at {width} px{' dark' if dark else ''}"
            assert "/accounts/login/" not in driver.current_url, f"{where}: not logged in"
            slug = re.sub(r"[^a-z0-9]+", "-", url.lower()).strip("-") or "home"
            slug = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "id", slug)
            driver.save_screenshot(str(out / f"{role}-{slug}-{width}{'-dark' if dark else ''}.png"))
            if wide := horizontal_overflow(driver):
                failures.append(f"{where}: scrolls sideways: {wide}")
            failures += [f"{where}: no label: {c}" for c in unlabelled_controls(driver)]
            failures += [f"{where}: {v}" for v in axe_violations(driver)]
    assert not failures, f"{len(failures)} problems:\n" + "\n".join(failures)
