"""In Chromium: an admin sets a warm pool target from the pools page, and a fork's page follows
its progress live (its script reads the API's fork status) until none of its VMs is pending."""

from __future__ import annotations

from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from audit.models import Event
from tests.dashboard.pages import axe_violations, log_in

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def loaded(driver: Any, url: str) -> None:
    driver.get(url)
    WebDriverWait(driver, 10).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )


def test_an_admin_sets_a_pool_target_in_the_browser(make_user, web_server, browser) -> None:
    admin = make_user("admin", "pool-admin")
    driver = browser()
    log_in(driver, web_server.url, admin)
    loaded(driver, f"{web_server.url}/vms/pools/")
    assert driver.find_element(By.ID, "nav-pools").is_displayed()
    assert driver.find_element(By.CSS_SELECTOR, "#pool-budget meter").is_displayed()
    row = driver.find_element(By.CSS_SELECTOR, 'tr[data-template="linux-small"]')
    field = row.find_element(By.NAME, "target")
    field.clear()
    field.send_keys("2")
    row.find_element(By.TAG_NAME, "button").click()
    WebDriverWait(driver, 10).until(lambda d: "set to 2 (was 0)" in d.page_source)
    row = driver.find_element(By.CSS_SELECTOR, 'tr[data-template="linux-small"]')
    assert row.find_element(By.CSS_SELECTOR, '[data-field="target"]').text == "2"
    event = Event.objects.get(type="pool.target_set")
    assert event.payload["target"] == 2 and event.actor_id == str(admin.pk)
    assert axe_violations(driver) == []


def test_a_forks_page_follows_its_progress_live(make_user, web_server, browser) -> None:
    from accounts.caller import Caller
    from vms import commands, worker

    owner = make_user("operator", "forker")
    caller = Caller.for_user(owner)
    started = commands.create(caller, name="src", template="linux-small")
    commands.record_outcome(started.request, "vm.started", {"host": "h1", "hypervisor": "qemu"})
    forked = commands.fork(caller, started.vm, count=2)
    driver = browser()
    log_in(driver, web_server.url, owner)
    loaded(driver, f"{web_server.url}/vms/{started.vm_id}/forks/{forked.snapshot.pk}/")
    bar = driver.find_element(By.ID, "fork-progress")
    assert bar.get_attribute("max") == "2" and bar.get_attribute("value") == "0"
    # The restores end while the page is open: it shows them without a reload.
    for accepted, outcome in zip(forked.vms, ("vm.restored", "vm.restore_failed"), strict=True):
        request = worker.load_request(str(accepted.request.event_id))
        assert request is not None
        data = {"host": "h1", "hypervisor": "qemu"} if outcome == "vm.restored" else {"reason": "x"}
        commands.record_outcome(request, outcome, data)
    WebDriverWait(driver, 15).until(
        lambda d: d.find_element(By.ID, "fork-progress").get_attribute("value") == "2"
    )
    summary = driver.find_element(By.ID, "fork-summary").text
    assert "1 of 2 running, 1 failed, 0 pending" in summary
    phases = [c.text for c in driver.find_elements(By.CSS_SELECTOR, '[data-field="phase"]')]
    assert phases == ["running", "failed"]
    assert axe_violations(driver) == []
