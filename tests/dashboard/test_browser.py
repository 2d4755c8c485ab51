"""The dashboard in headless Chromium against the real ASGI server (daphne), a real worker and a
real QEMU guest: an operator creates a VM and watches it reach running without reloading, types
`uname -a` in the in-browser console and sees the guest answer; a viewer joining later sees the
scrollback, and its keystrokes never reach the guest. Screenshots go to artifacts/dashboard/."""

from __future__ import annotations

import time
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.dashboard.conftest import ARTIFACTS

pytestmark = [pytest.mark.browser, pytest.mark.guest, pytest.mark.django_db(transaction=True)]

PASSWORD = "pw-Long-enough-1"


def login(driver: Any, base: str, username: str) -> None:
    driver.get(f"{base}/accounts/login/")
    driver.find_element(By.NAME, "username").send_keys(username)
    driver.find_element(By.NAME, "password").send_keys(PASSWORD + Keys.ENTER)
    try:
        WebDriverWait(driver, 15).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, "header .who"))
        )
    except Exception:
        shot(driver, f"failed-login-{username}")
        raise AssertionError(f"login of {username} failed: {driver.page_source[:3000]}") from None


def shot(driver: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def terminal_text(driver: Any) -> str:
    return driver.execute_script("return window.sandboxConsole ? window.sandboxConsole.text() : ''")


def wait_text(driver: Any, needle: str, timeout: float, what: str) -> str:
    try:
        WebDriverWait(driver, timeout, poll_frequency=0.2).until(
            lambda d: needle in terminal_text(d)
        )
    except Exception:
        shot(driver, f"failed-{what}")
        raise AssertionError(
            f"{what}: {needle!r} not in the terminal:\n{terminal_text(driver)}"
        ) from None
    return terminal_text(driver)


def type_keys(driver: Any, text: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, "#terminal .xterm-helper-textarea")
    box.send_keys(text)


def test_operator_console_and_viewer(make_user, asgi_server, worker, browser, vm_dirs) -> None:
    from accounts.caller import Caller
    from tests.vms.conftest import wait_for
    from vms import commands
    from vms.models import VirtualMachine

    operator = make_user("operator", "olga", PASSWORD)
    make_user("viewer", "victor", PASSWORD)
    base = asgi_server.url
    started = time.monotonic()

    op = browser()
    login(op, base, "olga")
    op.get(f"{base}/vms/new/")
    op.find_element(By.NAME, "name").send_keys("web-ui")
    op.find_element(By.CSS_SELECTOR, "select[name=template] option[value=linux-small]").click()
    shot(op, "01-create-form")
    op.find_element(By.ID, "create-submit").click()
    WebDriverWait(op, 15).until(ec.presence_of_element_located((By.ID, "vm-page")))
    vm = VirtualMachine.objects.get(name="web-ui")
    try:
        # A marker that a reload would wipe: the state must change under it.
        op.execute_script("window.__notReloaded = true")
        state = (By.CSS_SELECTOR, '#vm-page [data-field="state"]')
        try:
            WebDriverWait(op, 120, poll_frequency=0.3).until(
                lambda d: d.find_element(*state).text in ("running", "failed")
            )
        finally:
            shot(op, "02-vm-detail")
        assert op.find_element(*state).text == "running", VirtualMachine.objects.get(
            pk=vm.pk
        ).last_error
        assert op.execute_script("return window.__notReloaded === true"), "the page was reloaded"
        timeline = op.find_element(By.ID, "vm-timeline").text
        assert "vm.started" in timeline and "vm.progress" in timeline
        WebDriverWait(op, 10).until(
            lambda d: (
                d.find_element(By.CSS_SELECTOR, '[data-metric="rss_bytes"]').text not in ("—", "")
            )
        )
        shot(op, "03-vm-running-metrics")

        op.find_element(By.ID, "open-console").click()
        WebDriverWait(op, 15).until(
            lambda d: "connected to ttyS0" in d.find_element(By.ID, "console-status").text
        )
        type_keys(op, "\n")  # a fresh prompt
        time.sleep(0.3)
        type_keys(op, "uname -a\n")
        text = wait_text(op, "GNU/Linux", 20, "uname output")
        assert "Linux web-ui" in text, text
        shot(op, "04-console-operator")

        viewer = browser()
        login(viewer, base, "victor")
        viewer.get(f"{base}/vms/{vm.pk}/console/")
        # A late joiner first gets the scrollback: the operator's command and its answer.
        seen = wait_text(viewer, "GNU/Linux", 15, "viewer scrollback")
        assert "uname -a" in seen
        assert "read-only" in viewer.find_element(By.ID, "console-mode").text
        type_keys(viewer, "echo viewer-was-here\n")
        type_keys(op, "echo op-$((6*7))\n")
        wait_text(viewer, "op-42", 10, "operator output live on the viewer's screen")
        time.sleep(0.5)
        assert "viewer-was-here" not in terminal_text(op)
        assert "viewer-was-here" not in terminal_text(viewer)
        shot(viewer, "05-console-viewer")

        op.get(f"{base}/vms/")
        assert "web-ui" in op.find_element(By.ID, "vm-list").text
        shot(op, "06-vm-list")
    finally:
        # Close the consoles (the sessions are recorded on close) and destroy the guest.
        for driver in (op, *([viewer] if "viewer" in locals() else [])):
            driver.get("about:blank")
        fresh = VirtualMachine.objects.get(pk=vm.pk)
        if fresh.state != "destroyed":
            commands.destroy(Caller.for_user(operator, channel="api"), fresh)
        wait_for(
            lambda: VirtualMachine.objects.get(pk=vm.pk).state == "destroyed", 60, "the VM to go"
        )
    from audit.models import Event

    wait_for(
        lambda: (
            Event.objects.filter(aggregate_id=str(vm.pk), type="vm.console_closed").count() >= 2
        ),
        10,
        "the console sessions to be closed and recorded",
    )
    assert time.monotonic() - started < 120
