"""Console replay in headless Chromium: the terminal keeps the recording's columns and fits its
frame at 1280 and 390 px (the font scales down), and the seek bar jumps to any time, the screen
rebuilt from the frames up to it."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.dashboard.pages import horizontal_overflow, log_in, viewport

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

COLS = 160
FRAMES = [
    (0.5, "o", "first line " + "=" * 120 + "\r\n"),
    (4.0, "o", "second line\r\n"),
    (9.0, "o", "third line\r\n"),
    (10.0, "o", "$ "),
]


def recorded_session(owner: Any, vm: Any, tmp_path: Any, settings: Any) -> int:
    """A 160-column, 10 s recording and its events; the position of its closing event."""
    from vms import console

    settings.SANDBOX_CONSOLE_DIR = tmp_path / "console"  # the web_server's directory
    path, ref = console.new_recording_path(str(vm.pk), "wide")
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"version": 2, "width": COLS, "height": 24, "timestamp": 0}
    body = "\n".join(json.dumps(x) for x in [header, *map(list, FRAMES)]) + "\n"
    path.write_text(body)
    data = path.read_bytes()
    actor = console.session_actor(owner, {"client": ("127.0.0.1", 1)})
    opened = console.record_opened(
        actor, str(vm.pk), session="wide", mode="write", recording=ref, cols=COLS, rows=24
    )
    closed = console.record_closed(
        actor,
        str(vm.pk),
        session="wide",
        opened_event_id=opened.event_id,
        recording=ref,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        duration_s=10.0,
        input_bytes=0,
        output_bytes=len(data),
        ignored_input_bytes=0,
    )
    return closed.position


def ready(driver: Any) -> None:
    WebDriverWait(driver, 10).until(
        lambda d: d.execute_script("return !!(window.sandboxReplay && sandboxReplay.term)")
    )
    time.sleep(0.3)


def fits(driver: Any) -> dict[str, float]:
    return driver.execute_script(
        "const f = document.querySelector('.terminal-wrap').getBoundingClientRect();"
        "const s = document.querySelector('#terminal .xterm-screen').getBoundingClientRect();"
        "return {frame: f.right, screen: s.right, cols: sandboxReplay.term.cols};"
    )


@pytest.mark.parametrize("width", [1280, 390])
def test_the_replay_terminal_fits_its_frame(
    width, make_user, make_vm, web_server, browser, tmp_path, settings
) -> None:
    olga = make_user("operator", "olga")
    position = recorded_session(olga, make_vm(olga, "wide"), tmp_path, settings)
    driver = browser()
    viewport(driver, width)
    log_in(driver, web_server.url, make_user("auditor", "aud"))
    driver.get(f"{web_server.url}/audit/sessions/{position}/replay/")
    ready(driver)
    got = fits(driver)
    assert got["cols"] == COLS
    assert got["screen"] <= got["frame"] + 0.5, got
    assert horizontal_overflow(driver) is None


def test_the_seek_bar_jumps_to_any_time(
    make_user, make_vm, web_server, browser, tmp_path, settings
) -> None:
    olga = make_user("operator", "olga")
    position = recorded_session(olga, make_vm(olga, "wide"), tmp_path, settings)
    driver = browser()
    log_in(driver, web_server.url, make_user("auditor", "aud"))
    driver.get(f"{web_server.url}/audit/sessions/{position}/replay/")
    ready(driver)
    driver.find_element(By.ID, "replay-play").click()  # pause
    assert not driver.execute_script("return sandboxReplay.playing()")
    seek = driver.find_element(By.ID, "replay-seek")
    assert seek.get_attribute("disabled") is None

    def seek_to(permille: int) -> str:
        driver.execute_script(
            "const s = document.getElementById('replay-seek');"
            "s.value = arguments[0]; s.dispatchEvent(new Event('input', {bubbles: true}));",
            permille,
        )
        time.sleep(0.4)
        return driver.execute_script("return sandboxReplay.screenText()")

    screen = seek_to(600)  # 6 s
    assert "first line" in screen and "second line" in screen and "third line" not in screen
    assert driver.find_element(By.ID, "replay-time").text.startswith("6.0 / 10.0")
    screen = seek_to(100)  # back to 1 s
    assert "first line" in screen and "second line" not in screen
    screen = seek_to(1000)
    assert "third line" in screen
    # Playing on from a sought time at 64x reaches the end within a second.
    seek_to(300)
    driver.find_element(By.CSS_SELECTOR, "#replay-speed option[value='64']").click()
    driver.find_element(By.ID, "replay-play").click()
    WebDriverWait(driver, 3).until(lambda d: d.execute_script("return sandboxReplay.done()"))
    assert "third line" in driver.execute_script("return sandboxReplay.screenText()")
