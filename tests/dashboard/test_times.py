"""Time labels: every page writes a moment as ``<time>`` in UTC with the zone named (the
``when`` filter), and the header's toggle shows them all, live rows too, in the browser's zone."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from django.template import Context, Template, TemplateSyntaxError
from django.test import Client

from accounts.caller import Caller
from vms import commands


def _render(source: str, **context: Any) -> str:
    return Template(source).render(Context(context))


def test_the_filter_writes_utc_with_the_zone_named() -> None:
    kolkata = dt.timezone(dt.timedelta(hours=5, minutes=30))
    moment = dt.datetime(2026, 11, 30, 18, 54, 2, 123456, tzinfo=kolkata)  # 13:24:02 UTC
    assert _render("{{ t|when }}", t=moment) == (
        '<time datetime="2026-11-30T13:24:02.123456+00:00" data-when="s">'
        "2026-11-30 13:24:02 UTC</time>"
    )
    assert ">2026-11-30 13:24 UTC<" in _render('{{ t|when:"m" }}', t=moment)
    assert ">13:24:02 UTC<" in _render('{{ t|when:"t" }}', t=moment)
    assert ">2026-11-30 13:24:02.123456 UTC<" in _render('{{ t|when:"ms" }}', t=moment)
    assert ">2026-11-30<" in _render("{{ d|when }}", d=dt.date(2026, 11, 30))  # a date: no zone
    assert ">2026-11-30 13:24:02 UTC<" in _render("{{ t|when }}", t="2026-11-30T13:24:02+00:00")
    assert _render('{{ t|when|default:"never" }}', t=None) == "never"
    assert _render("{{ t|when }}", t="not a time") == "not a time"  # shown as it came, escaped
    assert _render("{{ t|when }}", t="<b>") == "&lt;b&gt;"
    with pytest.raises(TemplateSyntaxError):
        _render('{{ t|when:"y" }}', t=moment)


@pytest.mark.django_db
def test_no_page_writes_a_time_without_its_zone(make_user, make_vm) -> None:
    """The VM page, the list, the tasks and the home page: their moments are <time> labels."""
    opal = make_user("operator", "opal")
    vm = make_vm(opal, "zoned")
    commands.start(Caller.for_user(opal), vm)
    client = Client()
    client.force_login(opal)
    for url in ("/", "/vms/", f"/vms/{vm.pk}/", "/tasks/"):
        html = client.get(url).content.decode()
        assert 'data-when="' in html, url
        assert " UTC</time>" in html, url


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_the_toggle_shows_every_time_in_the_browsers_zone(
    make_user, make_vm, web_server, browser
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.dashboard.pages import log_in

    opal = make_user("operator", "opal")
    vm = make_vm(opal, "zoned")
    commands.record_outcome(
        commands.start(Caller.for_user(opal), vm).request, "vm.started", {}
    )  # a task on the page before the toggle
    stop = commands.stop(Caller.for_user(opal), vm).request
    commands.record_outcome(stop, "vm.stopped", {"graceful": True, "how": "acpi"})
    driver = browser()
    driver.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": "Asia/Kolkata"})
    log_in(driver, web_server.url, opal)
    driver.get(f"{web_server.url}/tasks/")
    WebDriverWait(driver, 15).until(lambda d: d.find_element(By.ID, "live-status").text == "live")

    def labels() -> list[str]:
        return [t.text for t in driver.find_elements(By.CSS_SELECTOR, "time[data-when]")]

    assert labels() and all(text.endswith(" UTC") for text in labels())
    toggle = driver.find_element(By.ID, "times-toggle")
    assert toggle.text == "Times: UTC"
    toggle.click()
    assert toggle.text == "Times: local"
    shown = labels()
    assert shown and not any(text.endswith(" UTC") for text in shown), shown
    first = driver.find_element(By.CSS_SELECTOR, "time[data-when]")
    utc = dt.datetime.fromisoformat(first.get_attribute("datetime")).astimezone(dt.UTC)
    local = utc.astimezone(dt.timezone(dt.timedelta(hours=5, minutes=30)))
    assert first.text.startswith(local.strftime("%Y-%m-%d %H:%M:%S")), first.text
    assert first.get_attribute("title") == f"{utc:%Y-%m-%d %H:%M:%S} UTC"
    # A row that arrives live is shown in the chosen zone too, and the choice is kept.
    request = commands.start(Caller.for_user(opal, channel="web"), vm).request
    row = f'tr[data-task="{request.event_id}"] time[data-when]'
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, row))
    assert not driver.find_element(By.CSS_SELECTOR, row).text.endswith(" UTC")
    driver.refresh()
    WebDriverWait(driver, 10).until(
        lambda d: d.find_element(By.ID, "times-toggle").text == "Times: local"
    )
    assert not any(text.endswith(" UTC") for text in labels())
