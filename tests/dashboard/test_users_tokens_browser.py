"""Users and tokens in headless Chromium: a role changes only through its button and a
confirmation naming the new role, a token is revoked only once confirmed, and a new token's copy
button puts it on the clipboard and says so in a live region."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.test import override_settings
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from audit.models import Event
from tests.dashboard.pages import axe_violations, horizontal_overflow, log_in, viewport

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def loaded(driver: Any, url: str) -> None:
    driver.get(url)
    WebDriverWait(driver, 10).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )


def dialog(driver: Any) -> Any:
    return WebDriverWait(driver, 5).until(lambda d: d.switch_to.alert)


def test_a_role_changes_only_through_its_button_and_a_confirmation(
    make_user, web_server, browser
) -> None:
    admin = make_user("admin", "ada")
    carol = make_user("viewer", "carol")
    driver = browser()
    log_in(driver, web_server.url, admin)
    loaded(driver, f"{web_server.url}/accounts/users/")
    select = Select(driver.find_element(By.ID, f"role-{carol.pk}"))
    select.select_by_value("operator")
    time.sleep(1.0)  # time for a submit on change, were there one
    assert driver.current_url.endswith("/accounts/users/")
    assert not driver.execute_script("return document.readyState !== 'complete'")
    carol.refresh_from_db()
    assert carol.role == "viewer" and not Event.objects.filter(type="user.role_changed").exists()
    button = driver.find_element(By.CSS_SELECTOR, f"#role-{carol.pk} + button")
    button.click()
    question = dialog(driver)
    assert "from viewer to operator" in question.text
    question.dismiss()
    time.sleep(0.5)
    carol.refresh_from_db()
    assert carol.role == "viewer" and not Event.objects.filter(type="user.role_changed").exists()
    driver.find_element(By.CSS_SELECTOR, f"#role-{carol.pk} + button").click()
    dialog(driver).accept()
    WebDriverWait(driver, 10).until(lambda d: "carol is now operator" in d.page_source)
    carol.refresh_from_db()
    assert carol.role == "operator"
    event = Event.objects.get(type="user.role_changed")
    assert (event.payload["from"], event.payload["to"], event.actor_name) == (
        "viewer",
        "operator",
        "ada",
    )


def test_a_token_is_revoked_only_once_confirmed(make_user, web_server, browser) -> None:
    from accounts import commands
    from audit.actor import Actor

    olga = make_user("operator", "olga")
    issued = commands.create_token(Actor.system(), olga, name="ci", by=olga)
    driver = browser()
    log_in(driver, web_server.url, olga)
    loaded(driver, f"{web_server.url}/accounts/tokens/")
    driver.find_element(By.CSS_SELECTOR, "#tokens form button").click()
    question = dialog(driver)
    assert "Revoke the token ci" in question.text
    question.dismiss()
    time.sleep(0.5)
    issued.token.refresh_from_db()
    assert issued.token.revoked_at is None
    driver.find_element(By.CSS_SELECTOR, "#tokens form button").click()
    dialog(driver).accept()
    WebDriverWait(driver, 10).until(lambda d: "Token ci revoked." in d.page_source)
    issued.token.refresh_from_db()
    assert issued.token.revoked_at is not None


def test_the_copy_button_puts_the_new_token_on_the_clipboard(
    make_user, web_server, browser
) -> None:
    olga = make_user("operator", "olga")
    driver = browser()
    driver.execute_cdp_cmd(
        "Browser.grantPermissions",
        {
            "origin": web_server.url,
            "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"],
        },
    )
    log_in(driver, web_server.url, olga)
    loaded(driver, f"{web_server.url}/accounts/tokens/")
    driver.find_element(By.ID, "id_name").send_keys("laptop")
    driver.find_element(By.CSS_SELECTOR, "#token-create button[type=submit]").click()
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.ID, "new-token"))
    shown = driver.find_element(By.ID, "new-token").text.strip()
    assert shown.startswith("sbx_")
    status = driver.find_element(By.ID, "copy-status")
    assert status.get_attribute("aria-live") == "polite" and status.text == ""
    button = driver.find_element(By.ID, "copy-token")
    assert button.is_displayed()
    button.click()
    WebDriverWait(driver, 5).until(lambda d: status.text)
    assert status.text == "Copied to the clipboard."
    pasted = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "navigator.clipboard.readText().then(done, (e) => done('error: ' + e));"
    )
    assert pasted == shown


def test_without_the_clipboard_the_token_is_selected_and_the_user_told(
    make_user, web_server, browser
) -> None:
    olga = make_user("operator", "olga")
    driver = browser()
    for name in ("clipboard-write", "clipboard-read"):
        driver.execute_cdp_cmd(
            "Browser.setPermission",
            {"origin": web_server.url, "permission": {"name": name}, "setting": "denied"},
        )
    log_in(driver, web_server.url, olga)
    loaded(driver, f"{web_server.url}/accounts/tokens/")
    driver.find_element(By.ID, "id_name").send_keys("laptop")
    driver.find_element(By.CSS_SELECTOR, "#token-create button[type=submit]").click()
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.ID, "new-token"))
    shown = driver.find_element(By.ID, "new-token").text.strip()
    status = driver.find_element(By.ID, "copy-status")
    driver.find_element(By.ID, "copy-token").click()
    WebDriverWait(driver, 5).until(lambda d: status.text)
    assert "press Ctrl+C" in status.text
    assert driver.execute_script("return window.getSelection().toString().trim()") == shown


@override_settings(SANDBOX_LOCKOUT_THRESHOLD=2)
def test_a_locked_user_is_shown_and_unlocked_in_the_browser(make_user, web_server, browser) -> None:
    """The lock badge and the Unlock button pass axe-core and fit a phone; Unlock asks first."""
    from accounts import commands
    from audit.actor import Actor

    admin = make_user("admin", "ada")
    uma = make_user("viewer", "uma")
    for _ in range(2):
        commands.record_login_failure(Actor.anonymous("uma"), "uma", "bad_password")
    assert commands.is_locked("uma")
    driver = browser()
    log_in(driver, web_server.url, admin)
    for width in (1280, 390):
        viewport(driver, width)
        for url in ("/accounts/users/", f"/accounts/users/{uma.pk}/"):
            loaded(driver, web_server.url + url)
            assert "locked until" in driver.find_element(By.CSS_SELECTOR, "main").text
            assert horizontal_overflow(driver) is None, (url, width)
            assert axe_violations(driver) == [], (url, width)
    driver.find_element(By.CSS_SELECTOR, "form[action$='/unlock/'] button").click()
    question = dialog(driver)
    assert "Unlock uma?" in question.text
    question.accept()
    WebDriverWait(driver, 10).until(lambda d: "uma unlocked." in d.page_source)
    assert driver.current_url.endswith(f"/accounts/users/{uma.pk}/")
    assert commands.is_locked("uma") is None
    assert Event.objects.get(type="auth.unlocked").actor_name == "ada"
