"""Users and tokens in the dashboard (Django test client): an account's lock and its unlock, a
new password set by an admin, confirmations on every form that changes a user or a token, and a
new token's limits (scopes, allowed addresses, expiry) as the API offers them. The browser's side
(the confirmation dialogs, the copy button) is in test_users_tokens_browser.py."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

import pytest
from django.test import Client, override_settings

from audit.models import Event

pytestmark = pytest.mark.django_db

PASSWORD = "pw-Long-enough-1"


def client_for(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def lock(username: str) -> None:
    """Failed logins until ``username`` locks (the threshold is 2 in these tests)."""
    from accounts import commands
    from audit.actor import Actor

    for _ in range(2):
        commands.record_login_failure(Actor.anonymous(username), username, "bad_password")
    assert commands.is_locked(username)


class Forms(HTMLParser):
    """Each form of a page: its action, attributes and the names of its controls."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self.forms.append({"attrs": a, "controls": [], "buttons": 0})
        elif self.forms and tag in ("input", "select", "textarea"):
            self.forms[-1]["controls"].append((tag, a))
        elif self.forms and tag == "button":
            self.forms[-1]["buttons"] += 1


def forms_of(html: str, action_part: str) -> list[dict[str, Any]]:
    parser = Forms()
    parser.feed(html)
    return [f for f in parser.forms if (f["attrs"].get("action") or "").endswith(action_part)]


@override_settings(SANDBOX_LOCKOUT_THRESHOLD=2)
def test_users_page_shows_a_lock_and_an_admin_lifts_it(make_user) -> None:
    admin = make_user("admin", "ada")
    uma = make_user("viewer", "uma")
    page = client_for(admin).get("/accounts/users/").content.decode()
    assert "locked until" not in page and not forms_of(page, f"/users/{uma.pk}/unlock/")
    lock("uma")
    page = client_for(admin).get("/accounts/users/").content.decode()
    assert "locked until" in page
    (unlock,) = forms_of(page, f"/users/{uma.pk}/unlock/")
    assert "Unlock uma?" in unlock["attrs"]["data-confirm"]
    detail = client_for(admin).get(f"/accounts/users/{uma.pk}/").content.decode()
    assert "locked until" in detail and "2 in all" in detail
    answer = client_for(admin).post(f"/accounts/users/{uma.pk}/unlock/", follow=True)
    assert "uma unlocked." in answer.content.decode()
    event = Event.objects.get(type="auth.unlocked")
    assert (event.aggregate_id, event.actor_name) == ("uma", "ada")
    from accounts import commands

    assert commands.is_locked("uma") is None
    # Not locked: said so, and nothing recorded.
    again = client_for(admin).post(f"/accounts/users/{uma.pk}/unlock/", follow=True)
    assert "uma was not locked." in again.content.decode()
    assert Event.objects.filter(type="auth.unlocked").count() == 1


def test_an_admin_sets_a_new_password(make_user) -> None:
    admin = make_user("admin", "ada")
    uma = make_user("viewer", "uma")
    admin_client = client_for(admin)
    uma_client = client_for(uma)
    assert uma_client.get("/accounts/tokens/").status_code == 200
    url = f"/accounts/users/{uma.pk}/password/"
    page = admin_client.get(f"/accounts/users/{uma.pk}/").content.decode()
    (form,) = forms_of(page, url)
    assert "Set a new password for uma?" in form["attrs"]["data-confirm"]
    assert {a["name"] for _, a in form["controls"] if a.get("type") == "password"} == {
        "password1",
        "password2",
    }
    # Two different passwords, or one the validators refuse: nothing changes, nothing recorded.
    differ = admin_client.post(url, {"password1": "Brand-new-pw-77", "password2": "other-pw-78"})
    assert differ.status_code == 302
    weak = admin_client.post(url, {"password1": "123", "password2": "123"}, follow=True)
    assert "not changed" in weak.content.decode()
    uma.refresh_from_db()
    assert uma.check_password(PASSWORD)
    assert not Event.objects.filter(type="user.password_changed").exists()
    done = admin_client.post(
        url, {"password1": "Brand-new-pw-77", "password2": "Brand-new-pw-77"}, follow=True
    )
    assert "New password set for uma." in done.content.decode()
    uma.refresh_from_db()
    assert uma.check_password("Brand-new-pw-77")
    event = Event.objects.get(type="user.password_changed")
    assert event.actor_name == "ada" and event.payload["by_self"] is False
    assert "Brand-new-pw-77" not in str(event.payload)
    # The user's browser sessions end with the old password (Django's session hash).
    assert uma_client.get("/accounts/tokens/").status_code == 302


def test_an_admin_setting_its_own_password_stays_logged_in(make_user) -> None:
    admin = make_user("admin", "ada")
    client = client_for(admin)
    url = f"/accounts/users/{admin.pk}/password/"
    done = client.post(url, {"password1": "Brand-new-pw-77", "password2": "Brand-new-pw-77"})
    assert done.status_code == 302
    admin.refresh_from_db()
    assert admin.check_password("Brand-new-pw-77")
    assert client.get("/accounts/users/").status_code == 200
    assert Event.objects.get(type="user.password_changed").payload["by_self"] is True


def test_an_admin_turns_off_a_users_password_login(make_user) -> None:
    from accounts import commands
    from audit.actor import Actor

    admin = make_user("admin", "ada")
    uma = make_user("viewer", "uma")
    token = commands.create_token(Actor.system(), uma, name="ci", by=uma)
    uma_client = client_for(uma)
    url = f"/accounts/users/{uma.pk}/password/off/"
    page = client_for(admin).get(f"/accounts/users/{uma.pk}/").content.decode()
    (form,) = forms_of(page, url)
    assert "Turn off password login for uma?" in form["attrs"]["data-confirm"]
    done = client_for(admin).post(url, follow=True).content.decode()
    assert "uma can no longer log in with a password." in done
    uma.refresh_from_db()
    assert not uma.has_usable_password() and uma.is_active
    event = Event.objects.get(type="user.password_changed")
    assert event.payload["password_login"] is False and event.actor_name == "ada"
    # Its browser sessions end; its tokens keep working; the page offers no second turn-off.
    assert uma_client.get("/accounts/tokens/").status_code == 302
    token.token.refresh_from_db()
    assert token.token.is_active
    page = client_for(admin).get(f"/accounts/users/{uma.pk}/").content.decode()
    assert not forms_of(page, url) and "no (API tokens only)" in page
    again = client_for(admin).post(url, follow=True).content.decode()
    assert "uma had no password login." in again
    assert Event.objects.filter(type="user.password_changed").count() == 1
    # A new password gives it back.
    client_for(admin).post(
        f"/accounts/users/{uma.pk}/password/",
        {"password1": "Brand-new-pw-77", "password2": "Brand-new-pw-77"},
    )
    uma.refresh_from_db()
    assert uma.check_password("Brand-new-pw-77")
    assert client_for(make_user("operator", "olga")).post(url).status_code == 403


def test_only_user_managers_reach_the_new_user_pages(make_user) -> None:
    uma = make_user("viewer", "uma")
    operator = client_for(make_user("operator", "olga"))
    assert operator.get(f"/accounts/users/{uma.pk}/").status_code == 403
    assert operator.post(f"/accounts/users/{uma.pk}/unlock/").status_code == 403
    refused = operator.post(
        f"/accounts/users/{uma.pk}/password/",
        {"password1": "Brand-new-pw-77", "password2": "Brand-new-pw-77"},
    )
    assert refused.status_code == 403
    uma.refresh_from_db()
    assert uma.check_password(PASSWORD)
    assert client_for(uma).get(f"/accounts/users/{uma.pk}/unlock/").status_code in (403, 405)


def test_role_deactivate_and_revoke_forms_ask_first(make_user) -> None:
    from accounts import commands
    from audit.actor import Actor

    admin = make_user("admin", "ada")
    carol = make_user("viewer", "carol")
    commands.create_token(Actor.system(), carol, name="ci", by=carol)
    page = client_for(admin).get("/accounts/users/").content.decode()
    (role,) = forms_of(page, f"/users/{carol.pk}/role/")
    # An explicit button and a question naming the role chosen; the select no longer submits.
    assert role["buttons"] == 1
    assert role["attrs"]["data-confirm"].startswith(
        "Change the role of carol from viewer to {role}"
    )
    (select,) = [a for tag, a in role["controls"] if tag == "select"]
    assert "data-autosubmit" not in select
    (active,) = forms_of(page, f"/users/{carol.pk}/active/")
    assert "Deactivate carol?" in active["attrs"]["data-confirm"]
    detail = client_for(admin).get(f"/accounts/users/{carol.pk}/").content.decode()
    (revoke,) = forms_of(detail, "/revoke/")
    assert "Revoke the token ci" in revoke["attrs"]["data-confirm"]
    own = client_for(carol).get("/accounts/tokens/").content.decode()
    (revoke,) = forms_of(own, "/revoke/")
    assert "Revoke the token ci" in revoke["attrs"]["data-confirm"]


def test_an_admin_revokes_a_users_token_from_its_page(make_user) -> None:
    from accounts import commands
    from audit.actor import Actor

    admin = make_user("admin", "ada")
    carol = make_user("viewer", "carol")
    issued = commands.create_token(Actor.system(), carol, name="ci", by=carol)
    answer = client_for(admin).post(f"/accounts/tokens/{issued.token.pk}/revoke/", {"next": "user"})
    assert answer["Location"] == f"/accounts/users/{carol.pk}/"
    issued.token.refresh_from_db()
    assert issued.token.revoked_at is not None
    assert Event.objects.get(type="token.revoked").actor_name == "ada"


def test_a_new_token_gets_scopes_addresses_and_expiry_from_the_form(make_user) -> None:
    from accounts.models import APIToken

    olga = make_user("operator", "olga")
    client = client_for(olga)
    page = client.get("/accounts/tokens/").content.decode()
    (form,) = [f for f in forms_of(page, "") if f["attrs"].get("id") == "token-create"]
    offered = {a["value"] for _, a in form["controls"] if a.get("name") == "scopes"}
    # The scopes the user holds, and no other (an operator reads no audit trail).
    assert "vms.exec_vm" in offered and "accounts.add_apitoken" in offered
    assert "audit.view_audit_trail" not in offered and "accounts.manage_users" not in offered
    assert {a.get("name") for _, a in form["controls"]} >= {"expires_days", "allowed_ips"}
    made = client.post(
        "/accounts/tokens/",
        {
            "name": "deploy",
            "expires_days": "7",
            "scopes": ["vms.exec_vm", "vms.operate_vm"],
            "allowed_ips": "10.0.0.0/8,\n192.0.2.7",
        },
    )
    assert made.status_code == 200
    assert 'class="errors"' not in made.content.decode(), made.content.decode()
    token = APIToken.objects.get(name="deploy")
    assert token.scopes == ["vms.exec_vm", "vms.operate_vm"]
    assert token.allowed_ips == ["10.0.0.0/8", "192.0.2.7/32"]
    assert 6 <= (token.expires_at - token.created_at).days <= 7
    event = Event.objects.get(type="token.created")
    assert (
        event.payload["scopes"] == token.scopes
        and event.payload["allowed_ips"] == token.allowed_ips
    )
    body = made.content.decode()
    assert 'data-copy="new-token"' in body and 'aria-live="polite"' in body
    assert "<code>vms.exec_vm</code>" in body and "<code>10.0.0.0/8</code>" in body


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("allowed_ips", "10.0.0.300", "is not an IP address or network"),
        ("allowed_ips", "fe80::1%eth0", "zone"),
        ("scopes", ["audit.view_audit_trail"], "Select a valid choice"),
        ("expires_days", "0", "greater than or equal to 1"),
    ],
)
def test_a_token_with_bad_limits_is_refused_and_nothing_made(
    make_user, field, value, error
) -> None:
    from accounts.models import APIToken

    client = client_for(make_user("operator", "olga"))
    data: dict[str, Any] = {"name": "bad", "expires_days": "7", field: value}
    body = client.post("/accounts/tokens/", data).content.decode()
    assert error in body
    assert not APIToken.objects.exists()
    assert not Event.objects.filter(type="token.created").exists()
