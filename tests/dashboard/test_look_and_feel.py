"""The dashboard's frame in headless Chromium: styled error pages with the menu, a favicon, the
OS colour scheme with a light/dark/auto toggle kept in localStorage, a skip link, live regions for
what changes under the user, disabled buttons that look disabled and say why, and state badges
readable in both schemes."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from tests.dashboard.pages import AXE, log_in, viewport

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def loaded(driver: Any, url: str) -> None:
    driver.get(url)
    deadline = time.monotonic() + 10
    while driver.execute_script("return document.readyState") != "complete":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.2)


def luminance(driver: Any, selector: str, prop: str = "background-color") -> float:
    rgb = driver.execute_script(
        "const c = getComputedStyle(document.querySelector(arguments[0]))[arguments[1]];"
        "return c.match(/[0-9.]+/g).slice(0, 3).map(Number);",
        selector,
        prop,
    )
    r, g, b = (c / 255 for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


# --- error pages and the favicon -----------------------------------------------------------------


def test_error_pages_have_the_layout_and_menu(make_user, web_server, browser) -> None:
    from django.test import Client

    viewer = make_user("viewer", "vera")
    base = web_server.url
    driver = browser()
    # Logged out: the layout without the menu.
    loaded(driver, f"{base}/no-such-page/")
    assert driver.find_element(By.CSS_SELECTOR, "header.top .brand")
    assert "Page not found" in driver.find_element(By.TAG_NAME, "h1").text
    assert not driver.find_elements(By.CSS_SELECTOR, "header.top nav")
    assert driver.execute_script("return document.styleSheets.length") >= 1
    # Logged in: the menu, and the page says what happened.
    log_in(driver, base, viewer)
    for url, heading in (("/no-such-page/", "Page not found"), ("/accounts/users/", "Not allowed")):
        loaded(driver, base + url)
        assert heading in driver.find_element(By.TAG_NAME, "h1").text, driver.page_source[:500]
        assert driver.find_element(By.CSS_SELECTOR, "header.top nav a[href='/vms/']")
        assert "vera" in driver.find_element(By.CSS_SELECTOR, "header.top .who").text
    # The statuses stay, and the API keeps answering JSON.
    client = Client()
    client.force_login(viewer)
    assert client.get("/no-such-page/").status_code == 404
    assert client.get("/accounts/users/").status_code == 403
    api = client.get("/api/v1/no-such-thing/")
    assert api.status_code == 404 and api.json() == {"detail": "Not found."}


def test_server_and_bad_request_pages_use_the_layout(rf, db) -> None:
    """400 and 500 render the layout too; 500 without asking the database (it may be the cause)."""
    from django.core.exceptions import SuspiciousOperation
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from sandbox_site import errors

    request = rf.get("/vms/")
    with CaptureQueriesContext(connection) as queries:
        page = errors.server_error(request)
    assert page.status_code == 500 and not queries.captured_queries
    html = page.content.decode()
    assert 'class="top"' in html and "Server error" in html and "app.css" in html
    bad = errors.bad_request(rf.get("/vms/"), SuspiciousOperation("x"))
    assert bad.status_code == 400 and "Bad request" in bad.content.decode()
    api = errors.server_error(rf.get("/api/v1/vms/"))
    assert api["Content-Type"] == "application/json"


def test_favicon(web_server, browser) -> None:
    driver = browser()
    loaded(driver, f"{web_server.url}/accounts/login/")
    href = driver.execute_script(
        "const l = document.querySelector('link[rel=icon]'); return l && l.href"
    )
    assert href, "no <link rel=icon> in the layout"
    for url in (href, f"{web_server.url}/favicon.ico"):
        got = driver.execute_async_script(
            "const done = arguments[1]; fetch(arguments[0]).then(async (r) =>"
            " done([r.status, r.headers.get('content-type'), (await r.text()).slice(0, 200)]))",
            url,
        )
        assert got[0] == 200 and got[1].startswith("image/svg+xml") and "<svg" in got[2], got


# --- colour scheme ----------------------------------------------------------------------------------


def test_follows_the_os_scheme_and_the_toggle_is_kept(make_user, web_server, browser) -> None:
    operator = make_user("operator", "otto")
    driver = browser()
    log_in(driver, web_server.url, operator)
    viewport(driver, 1280, dark=True)
    loaded(driver, f"{web_server.url}/vms/")
    assert luminance(driver, "body") < 0.2, "the OS prefers dark, the page is light"
    assert luminance(driver, "body", "color") > 0.6
    viewport(driver, 1280, dark=False)
    assert luminance(driver, "body") > 0.8, "the OS prefers light again"

    toggle = driver.find_element(By.ID, "theme-toggle")
    assert toggle.get_attribute("aria-label") or toggle.text
    seen = []
    for _ in range(3):
        toggle.click()
        seen.append(
            (
                driver.execute_script("return localStorage.getItem('theme')"),
                driver.execute_script("return document.documentElement.dataset.theme || ''"),
                round(luminance(driver, "body"), 1),
            )
        )
    choices = [s[0] for s in seen]
    assert sorted(choices) == ["auto", "dark", "light"], seen
    for choice, attr, lum in seen:
        if choice == "dark":
            assert attr == "dark" and lum < 0.2, seen
        if choice == "light":
            assert attr == "light" and lum > 0.8, seen
    # The choice survives a reload and overrides the OS (no inline script: a file in <head>).
    driver.execute_script("localStorage.setItem('theme', 'dark')")
    loaded(driver, f"{web_server.url}/accounts/tokens/")
    assert luminance(driver, "body") < 0.2
    assert "dark" in driver.find_element(By.ID, "theme-toggle").text.lower()
    driver.execute_script("localStorage.setItem('theme', 'auto')")
    viewport(driver, 1280, dark=True)
    loaded(driver, f"{web_server.url}/accounts/tokens/")
    assert luminance(driver, "body") < 0.2


def test_state_badges_are_readable_in_both_schemes(make_user, web_server, browser) -> None:
    """Every state's badge (destroyed included) at 4.5:1 or better, light and dark."""
    from vms.models import VMState

    driver = browser()
    log_in(driver, web_server.url, make_user("viewer", "val"))
    for dark in (False, True):
        viewport(driver, 1280, dark=dark)
        loaded(driver, f"{web_server.url}/vms/")
        driver.execute_script(AXE.read_text())
        driver.execute_script(
            "const box = document.createElement('p'); box.id = 'all-states';"
            "for (const s of arguments[0]) { const b = document.createElement('span');"
            " b.className = 'state state-' + s; b.textContent = s; box.append(b, ' '); }"
            "document.querySelector('main').append(box);",
            [s.value for s in VMState],
        )
        result = driver.execute_async_script(
            "const done = arguments[0]; axe.run('#all-states', {runOnly: ['color-contrast']})"
            ".then((r) => done(JSON.stringify(r.violations.flatMap((v) => v.nodes.map("
            "(n) => n.target.join(' ') + ': ' + n.failureSummary)))))"
        )
        assert json.loads(result) == [], ("dark" if dark else "light", result)


# --- keyboard, live regions, disabled buttons -----------------------------------------------------


def test_skip_link_goes_to_the_content(make_user, web_server, browser) -> None:
    driver = browser()
    log_in(driver, web_server.url, make_user("operator", "sam"))
    loaded(driver, f"{web_server.url}/vms/")
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    first = driver.switch_to.active_element
    assert first.tag_name == "a" and "skip" in first.text.lower(), first.text
    assert first.is_displayed(), "the skip link is not shown when focused"
    target = first.get_attribute("href").split("#", 1)[1]
    first.send_keys(Keys.ENTER)
    assert driver.execute_script("return document.activeElement.id") == target
    assert driver.find_element(By.ID, target).tag_name == "main"


def test_vm_page_live_regions_and_disabled_buttons_say_why(
    make_user, make_vm, web_server, browser
) -> None:
    operator = make_user("operator", "ola")
    vm = make_vm(operator, name="quiet")  # stopped: stop, reboot, pause ... cannot run
    driver = browser()
    log_in(driver, web_server.url, operator)
    loaded(driver, f"{web_server.url}/vms/{vm.pk}/")

    def live(selector: str) -> str:
        return driver.execute_script(
            "const el = document.querySelector(arguments[0]);"
            "const r = el && el.closest('[aria-live], [role=status], [role=log], [role=alert]');"
            "return r ? (r.getAttribute('aria-live') || r.getAttribute('role')) : '';",
            selector,
        )

    for what in ('#vm-page [data-field="state"]', "#vm-progress .progress-text", "#exec-out"):
        assert live(what), f"{what} is in no live region"
    assert driver.find_element(By.CSS_SELECTOR, "#vm-progress progress").get_attribute("aria-label")

    disabled = driver.find_elements(By.CSS_SELECTOR, "button[data-verb]:disabled")
    enabled = driver.find_elements(By.CSS_SELECTOR, "button[data-verb]:enabled")
    assert disabled and enabled
    for button in disabled:
        verb = button.get_attribute("data-verb")
        why = driver.execute_script(
            "const b = arguments[0]; const ids = (b.getAttribute('aria-describedby') || '').split(' ');"
            "return ids.map((id) => document.getElementById(id)).filter(Boolean)"
            ".map((e) => e.textContent).join(' ').trim();",
            button,
        )
        assert why and "stopped" in why, f"{verb}: no reason ({why!r})"
        assert button.get_attribute("title"), f"{verb}: no tooltip"
        looks = driver.execute_script(
            "const s = getComputedStyle(arguments[0]); return [s.cursor, s.backgroundColor];",
            button,
        )
        lively = driver.execute_script(
            "return getComputedStyle(arguments[0]).backgroundColor;", enabled[0]
        )
        assert looks[0] == "not-allowed" and looks[1] != lively, (verb, looks, lively)
