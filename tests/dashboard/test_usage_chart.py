"""The VM page's usage history in a real browser: the charts draw the API's points with axes, and
the range picker asks for another range (no guest: the history is written as the tiers hold it)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.dashboard.test_browser import login, shot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def _history(vm_id: Any) -> None:
    from vms.models import UsageMinute, UsageRollupState, UsageSample

    now = int(time.time())
    UsageSample.objects.bulk_create(
        UsageSample(vm_id=vm_id, ts=ts, cpu=20.0 + (ts // 60) % 30, mem=3e8, net_rx=1e4 * (ts % 7))
        for ts in range((now - 3600) // 10 * 10, now // 10 * 10, 10)
    )
    minute_until = (now - 3600) // 60 * 60
    UsageMinute.objects.bulk_create(
        UsageMinute(
            vm_id=vm_id,
            ts=ts,
            cpu_sum=6 * 40.0,
            cpu_count=6,
            cpu_max=90.0,
            mem_sum=6 * 2e8,
            mem_count=6,
            mem_max=2.5e8,
        )  # fmt: skip
        for ts in range((now - 7 * 86400) // 60 * 60 + 60, minute_until, 60)
        if (ts // 3600) % 24 < 20  # four hours off each day: gaps
    )
    UsageRollupState.objects.update_or_create(tier="1m", defaults={"until": minute_until})


def test_the_vm_page_charts_its_history_and_the_picker_changes_the_range(
    make_user, make_vm, web_server, browser
) -> None:
    owner = make_user("operator", "chartowner")
    vm = make_vm(owner, "charted")
    _history(vm.pk)
    driver = browser()
    login(driver, web_server.url, "chartowner")
    driver.get(f"{web_server.url}/vms/{vm.pk}/")
    note = driver.find_element(By.CSS_SELECTOR, "#vm-history [data-history-note]")
    WebDriverWait(driver, 20).until(lambda d: "points" in note.text)
    assert "from 10s" in note.text, note.text  # the last hour: the fine tier
    assert "times in UTC" in note.text  # as every time on the pages, unless the user chose
    cpu = driver.find_element(By.CSS_SELECTOR, '[data-history="cpu"] svg')
    assert len(cpu.find_elements(By.CSS_SELECTOR, "path")) == 2  # average and maximum
    ticks = [t.text for t in cpu.find_elements(By.CSS_SELECTOR, "text.tick")]
    assert any(t.endswith("%") for t in ticks) and any(":" in t for t in ticks), ticks
    # The text alternative says in words what the chart shows: the range, average and peak.
    title = cpu.find_element(By.TAG_NAME, "title").get_attribute("textContent")
    assert "cpu: average" in title and "peak 49" in title and " UTC to " in title, title
    disk = driver.find_element(By.CSS_SELECTOR, '[data-history="disk"] svg')
    assert "no samples in this range" in disk.text  # null is not zero
    driver.execute_script("document.getElementById('vm-history').scrollIntoView()")
    shot(driver, "usage-history-1h")

    driver.find_element(By.CSS_SELECTOR, 'button[data-range="7d"]').click()
    WebDriverWait(driver, 20).until(lambda d: "1m" in note.text)
    pressed = driver.find_element(By.CSS_SELECTOR, 'button[data-range="7d"]')
    assert pressed.get_attribute("aria-pressed") == "true"
    cpu = driver.find_element(By.CSS_SELECTOR, '[data-history="cpu"] svg')
    # Four hours off each day: the average line breaks into a piece per day (or more).
    avg = cpu.find_elements(By.CSS_SELECTOR, "path")[0].get_attribute("d")
    days = [t.text for t in cpu.find_elements(By.CSS_SELECTOR, "text.tick") if "-" in t.text]
    assert len(days) == 4, days  # MM-DD under a week
    assert avg.count("M") >= 7, avg[:200]
    driver.execute_script("document.getElementById('vm-history').scrollIntoView()")
    shot(driver, "usage-history-7d")


def test_a_users_page_charts_the_summed_history_of_their_vms(
    make_user, make_vm, web_server, browser
) -> None:
    """An admin's page of a user draws that user's summed history (the users usage API); an
    operator, who may not see another user's usage, is not offered it."""
    from django.test import Client

    owner = make_user("operator", "ownerofmany")
    for name in ("one", "two"):
        _history(make_vm(owner, name).pk)
    admin = make_user("admin", "chartadmin")
    driver = browser()
    login(driver, web_server.url, "chartadmin")
    driver.get(f"{web_server.url}/accounts/users/{owner.pk}/")
    note = driver.find_element(By.CSS_SELECTOR, "#user-history [data-history-note]")
    WebDriverWait(driver, 20).until(lambda d: "points" in note.text)
    section = driver.find_element(By.ID, "user-history")
    assert f"/api/v1/users/{owner.pk}/usage/" in section.text
    cpu = driver.find_element(By.CSS_SELECTOR, '#user-history [data-history="cpu"] svg')
    ticks = [t.text for t in cpu.find_elements(By.CSS_SELECTOR, "text.tick")]
    # Two VMs at 20-49 % each: the sum's axis goes past what one of them reaches.
    assert any(t.endswith("%") and float(t.rstrip("%")) > 50 for t in ticks), ticks
    shot(driver, "usage-history-user")
    page = Client()
    page.force_login(admin)
    assert 'id="user-history"' in page.get(f"/accounts/users/{owner.pk}/").content.decode()
    page.force_login(owner)  # its own VM page has one; another user's page is not its to see
    assert page.get(f"/accounts/users/{admin.pk}/").status_code in (403, 404)


def test_the_charts_follow_the_dark_scheme(make_user, make_vm, web_server, browser) -> None:
    """In the dark scheme the charts are drawn on the dark chart background with the dark
    scheme's series colours (light boxes with pale ticks were unreadable there)."""
    from tests.dashboard.pages import viewport

    owner = make_user("operator", "darkcharts")
    vm = make_vm(owner, "dark")
    _history(vm.pk)
    driver = browser()
    viewport(driver, 1280, dark=True)
    login(driver, web_server.url, "darkcharts")
    driver.get(f"{web_server.url}/vms/{vm.pk}/")
    note = driver.find_element(By.CSS_SELECTOR, "#vm-history [data-history-note]")
    WebDriverWait(driver, 20).until(lambda d: "points" in note.text)
    chart = driver.find_element(By.CSS_SELECTOR, '[data-history="cpu"] svg')
    style = driver.execute_script(
        "const s = getComputedStyle(arguments[0]);"
        "const p = getComputedStyle(arguments[0].querySelector('path'));"
        "const t = getComputedStyle(arguments[0].querySelector('text.tick'));"
        "return [s.backgroundColor, p.stroke, t.fill];",
        chart,
    )
    assert style == ["rgb(12, 17, 25)", "rgb(143, 176, 255)", "rgb(161, 171, 186)"], style
    canvas = driver.find_element(By.CSS_SELECTOR, ".charts canvas")
    assert (
        driver.execute_script("return getComputedStyle(arguments[0]).backgroundColor", canvas)
        == "rgb(12, 17, 25)"
    )
