"""A VM's page and console in headless Chromium against the real ASGI server, a real worker and a
real QEMU guest: what the page shows without a reload or a keystroke.

- the command box shows why a missing command failed, and says in words when its answer is not
  the exec view's JSON (an ended session), never "SyntaxError: Unexpected token '<'";
- a snapshot's row goes from "creating" to "ready" with its size as it happens;
- a force stop says "forced stop" in the live timeline;
- the console shows the prompt, naming the VM's host, as soon as it opens.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait as _Wait

from tests.dashboard.test_browser import PASSWORD, login, shot, terminal_text


def WebDriverWait(driver: Any, timeout: float, poll_frequency: float = 0.5) -> Any:  # noqa: N802
    """Waits that look again when live updates replace the element being read."""
    return _Wait(
        driver,
        timeout,
        poll_frequency=poll_frequency,
        ignored_exceptions=(StaleElementReferenceException,),
    )


pytestmark = [pytest.mark.browser, pytest.mark.guest, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _this_recipes_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guests run this checkout's image (images/), pinned for the server and the worker:
    the cache is shared, and another checkout may make its own image current meanwhile."""
    from vms import images

    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    monkeypatch.setenv("SANDBOX_IMAGE_DIR", str(images.ensure_built().directory))


@pytest.fixture
def operator(make_user: Callable[..., Any]) -> Any:
    return make_user("operator", "opal", PASSWORD)


@pytest.fixture
def running_vm(operator: Any, asgi_server: Any, worker: Any, vm_dirs: Any) -> Iterator[Any]:
    """A VM started by the worker process (what the page drives), destroyed at the end."""
    from accounts.caller import Caller
    from tests.vms.conftest import wait_for
    from vms import commands
    from vms.models import VirtualMachine

    caller = Caller.for_user(operator, channel="api")
    vm = commands.create(caller, name="page-vm", template="linux-small").vm
    wait_for(
        lambda: VirtualMachine.objects.get(pk=vm.pk).state in ("running", "failed"),
        120,
        "the VM to start",
    )
    vm = VirtualMachine.objects.get(pk=vm.pk)
    assert vm.state == "running", vm.last_error
    yield vm
    fresh = VirtualMachine.objects.get(pk=vm.pk)
    if fresh.state != "destroyed":
        commands.destroy(caller, fresh)
    wait_for(lambda: VirtualMachine.objects.get(pk=vm.pk).state == "destroyed", 60, "the VM to go")


@pytest.fixture
def page(browser: Callable[[], Any], asgi_server: Any, running_vm: Any) -> Iterator[Any]:
    driver = browser()
    login(driver, asgi_server.url, "opal")
    driver.get(f"{asgi_server.url}/vms/{running_vm.pk}/")
    WebDriverWait(driver, 15).until(lambda d: d.find_element(By.ID, "live-status").text == "live")
    driver.execute_script("window.__notReloaded = true")
    yield driver
    driver.get("about:blank")  # closes the live socket


def run_command(driver: Any, command: str) -> str:
    box = driver.find_element(By.CSS_SELECTOR, "#exec-form input[name=command]")
    box.clear()
    box.send_keys(command)
    driver.find_element(By.CSS_SELECTOR, "#exec-form button").click()
    out = (By.ID, "exec-out")
    WebDriverWait(driver, 60, poll_frequency=0.2).until(
        lambda d: d.find_element(*out).text not in ("", "running…")
    )
    return driver.find_element(*out).text


def test_the_command_box_says_why_a_command_failed(page, running_vm) -> None:
    text = run_command(page, "nosuchcmd")
    shot(page, "vm-page-exec-missing-command")
    assert "nosuchcmd" in text and "No such file" in text, text
    assert "SyntaxError" not in text
    assert "failed" in page.find_element(By.ID, "exec-out").get_attribute("class")
    WebDriverWait(page, 10).until(
        lambda d: "vm.exec_failed" in d.find_element(By.ID, "vm-timeline").text
    )
    assert run_command(page, "echo fine").endswith("fine")

    page.delete_cookie("sessionid")  # the session ends (expiry, logout elsewhere)
    text = run_command(page, "echo fine")
    shot(page, "vm-page-exec-session-ended")
    assert "session has ended" in text, text
    assert "SyntaxError" not in text


def test_a_snapshot_row_shows_its_progress_without_a_reload(page, operator, running_vm) -> None:
    from accounts.caller import Caller
    from vms import commands

    # Taken through the API (as a script or another tab would): the open page only listens.
    commands.snapshot(Caller.for_user(operator, channel="api"), running_vm, name="live-snap")
    row = (By.XPATH, "//table[@id='vm-snapshots']//tr[td[1][text()='live-snap']]")
    WebDriverWait(page, 15, poll_frequency=0.1).until(lambda d: d.find_elements(*row))
    try:
        WebDriverWait(page, 90, poll_frequency=0.3).until(
            lambda d: "ready" in d.find_element(*row).text
        )
    finally:
        shot(page, "vm-page-snapshot-live")
    size, restore = page.execute_script(
        "const r = [...document.querySelectorAll('#vm-snapshots tr')]"
        ".find((tr) => tr.cells[0].textContent === 'live-snap');"
        "return [r.cells[3].textContent, !!r.querySelector('button[data-verb=restore]')];"
    )
    assert size not in ("0 bytes", ""), size
    assert restore
    assert page.execute_script("return window.__notReloaded === true"), "the page was reloaded"
    assert page.find_element(By.ID, "snapshots-changed").get_attribute("hidden") is not None


def test_a_force_stop_says_forced_in_the_live_timeline(page, operator, running_vm) -> None:
    from accounts.caller import Caller
    from vms import commands

    commands.stop(Caller.for_user(operator, channel="api"), running_vm, force=True)
    stopped = (By.CSS_SELECTOR, "#vm-timeline tr.ev-vm-stopped")
    try:
        WebDriverWait(page, 60, poll_frequency=0.3).until(lambda d: d.find_elements(*stopped))
    finally:
        shot(page, "vm-page-force-stop")
    row = page.find_element(*stopped)
    assert "forced stop: killed at once" in row.text
    assert row.find_elements(By.CSS_SELECTOR, ".ev-data .bad")
    assert page.execute_script("return window.__notReloaded === true"), "the page was reloaded"


def test_the_console_shows_the_prompt_at_once(browser, asgi_server, running_vm) -> None:
    driver = browser()
    login(driver, asgi_server.url, "opal")
    driver.get(f"{asgi_server.url}/vms/{running_vm.pk}/console/")
    want = f"root@{running_vm.hostname}"
    try:
        WebDriverWait(driver, 30, poll_frequency=0.2).until(lambda d: want in terminal_text(d))
    except Exception:
        shot(driver, "failed-console-prompt")
        raise AssertionError(f"no {want!r} without a keystroke:\n{terminal_text(driver)}") from None
    shot(driver, "console-prompt-at-once")
    assert "root@sandbox" not in terminal_text(driver)
    driver.get("about:blank")


def test_the_console_tools_send_keys_paste_copy_and_go_full_screen(
    browser, asgi_server, running_vm
) -> None:
    """The send-keys menu interrupts a running command (Ctrl-C as the serial byte), Paste types
    the clipboard (newlines as Enter), Copy puts the terminal's selection on the clipboard, and
    full screen fills the screen with the terminal."""
    from selenium.webdriver.support.ui import Select

    from tests.dashboard.test_browser import type_keys

    driver = browser()
    driver.execute_cdp_cmd(
        "Browser.grantPermissions",
        {
            "origin": asgi_server.url,
            "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"],
        },
    )
    login(driver, asgi_server.url, "opal")
    driver.get(f"{asgi_server.url}/vms/{running_vm.pk}/console/")
    prompt = f"root@{running_vm.hostname}"
    WebDriverWait(driver, 30, poll_frequency=0.2).until(lambda d: prompt in terminal_text(d))
    type_keys(driver, "sleep 300; echo never-$((6*7))\n")
    WebDriverWait(driver, 10).until(lambda d: "sleep 300" in terminal_text(d))
    Select(driver.find_element(By.ID, "send-key")).select_by_value("ctrl-c")
    WebDriverWait(driver, 10).until(lambda d: "^C" in terminal_text(d))
    # Paste: the clipboard's text typed into the guest, its newline as Enter.
    driver.execute_async_script(
        "navigator.clipboard.writeText('echo pasted-$((40+2))\\n').then(arguments[0])"
    )
    driver.find_element(By.ID, "paste").click()
    WebDriverWait(driver, 20, poll_frequency=0.2).until(lambda d: "pasted-42" in terminal_text(d))
    assert "never-42" not in terminal_text(driver)  # the sleep was interrupted
    # Copy: the selection onto the clipboard.
    driver.execute_script("window.sandboxConsole.term.selectAll()")
    driver.find_element(By.ID, "copy").click()
    copied = driver.execute_async_script("navigator.clipboard.readText().then(arguments[0])")
    assert "pasted-42" in copied
    driver.find_element(By.ID, "fullscreen").click()
    WebDriverWait(driver, 5).until(
        lambda d: d.execute_script("return document.fullscreenElement?.id") == "terminal-wrap"
    )
    shot(driver, "console-full-screen")
    driver.get("about:blank")


def test_the_vm_list_shows_live_cpu_memory_and_uptime(browser, asgi_server, running_vm) -> None:
    """The list's live columns fill for a running guest without a reload: CPU %, the memory the
    guest uses (its agent's figure) and its uptime, which then moves on."""
    driver = browser()
    login(driver, asgi_server.url, "opal")
    driver.get(f"{asgi_server.url}/vms/")
    row = f'tr[data-vm-id="{running_vm.pk}"]'

    def cell(d: Any, field: str) -> str:
        return d.find_element(By.CSS_SELECTOR, f'{row} [data-field="{field}"]').text

    WebDriverWait(driver, 60, poll_frequency=0.2).until(
        lambda d: cell(d, "cpu").endswith("%") and cell(d, "uptime") != ""
    )
    assert cell(driver, "used").endswith(("MiB", "KiB"))
    used_title = driver.find_element(By.CSS_SELECTOR, f'{row} [data-field="used"]').get_attribute(
        "title"
    )
    assert "guest" in used_title  # the guest's own figure once its agent answered
    first = cell(driver, "uptime")
    WebDriverWait(driver, 20, poll_frequency=0.2).until(lambda d: cell(d, "uptime") != first)
    driver.get("about:blank")


def test_the_console_sends_sysrq_and_ctrl_alt_del_through_the_guest(
    browser, asgi_server, running_vm
) -> None:
    """The keys a serial line cannot carry: a SysRq key is written to the guest kernel's
    /proc/sysrq-trigger by its agent (an exec in the log) and the kernel's answer shows in the
    console; Ctrl-Alt-Del, once confirmed, is the guest's own reboot."""
    from selenium.webdriver.support.ui import Select

    from audit.models import Event
    from tests.vms.conftest import wait_for

    driver = browser()
    login(driver, asgi_server.url, "opal")
    driver.get(f"{asgi_server.url}/vms/{running_vm.pk}/console/")
    WebDriverWait(driver, 30, poll_frequency=0.2).until(
        lambda d: f"root@{running_vm.hostname}" in terminal_text(d)
    )
    Select(driver.find_element(By.ID, "send-key")).select_by_value("sysrq-h")
    WebDriverWait(driver, 60, poll_frequency=0.2).until(
        lambda d: "sysrq: HELP" in terminal_text(d)
    )  # the kernel's help line, written to the console
    note = driver.find_element(By.ID, "console-note")
    WebDriverWait(driver, 30).until(lambda d: "done (audit event #" in note.text)
    execs = Event.objects.filter(aggregate_id=str(running_vm.pk), type="vm.exec_requested")
    assert any("/proc/sysrq-trigger" in " ".join(e.payload.get("argv", [])) for e in execs)
    boots = Event.objects.filter(aggregate_id=str(running_vm.pk), type="vm.rebooted").count()
    Select(driver.find_element(By.ID, "send-key")).select_by_value("ctrl-alt-del")
    driver.switch_to.alert.accept()
    wait_for(
        lambda: (
            Event.objects.filter(aggregate_id=str(running_vm.pk), type="vm.rebooted").count()
            > boots
        ),
        120,
        "the guest's reboot",
    )
    rebooted = Event.objects.filter(aggregate_id=str(running_vm.pk), type="vm.rebooted").last()
    assert rebooted.payload["how"] == "agent", rebooted.payload
    driver.get("about:blank")
