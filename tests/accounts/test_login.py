"""The dashboard login: events for every login and failure, and lockout."""

from __future__ import annotations

import pytest
from django.test import Client, override_settings

from audit.models import Event

pytestmark = pytest.mark.django_db

PASSWORD = "pw-Long-enough-1"


def login(client: Client, username: str, password: str):
    return client.post(
        "/accounts/login/", {"username": username, "password": password}, REMOTE_ADDR="192.0.2.10"
    )


def test_login_and_logout_are_events_with_provenance(make_user) -> None:
    make_user("operator", "lena")
    client = Client()
    response = login(client, "lena", PASSWORD)
    assert response.status_code == 302
    event = Event.objects.get(type="auth.logged_in")
    assert (event.actor_name, event.channel, event.source_ip) == ("lena", "dashboard", "192.0.2.10")
    assert event.request_id and event.request_id == event.correlation_id
    client.post("/accounts/logout/")
    assert Event.objects.filter(type="auth.logged_out", aggregate_id="lena").exists()


@override_settings(SANDBOX_LOCKOUT_THRESHOLD=3)
def test_repeated_failures_lock_the_account_and_the_lock_is_an_event(make_user) -> None:
    make_user("operator", "max")
    client = Client()
    for _ in range(3):
        response = login(client, "max", "wrong")
        assert response.status_code == 200
    assert "locked" in response.content.decode()
    lock = Event.objects.get(type="auth.locked_out")
    assert lock.aggregate_id == "max" and lock.payload["failures"] == 3
    # Even the right password is refused while locked, and that attempt is recorded too.
    response = login(client, "max", PASSWORD)
    assert response.status_code == 200 and "locked" in response.content.decode()
    reasons = [
        e.payload["reason"]
        for e in Event.objects.filter(type="auth.login_failed").order_by("position")
    ]
    assert reasons == ["bad_credentials"] * 3 + ["locked"]
    assert not Event.objects.filter(type="auth.logged_in").exists()


@override_settings(SANDBOX_LOCKOUT_THRESHOLD=2)
def test_admin_unlock_lets_the_user_in_again(make_user) -> None:
    from accounts import commands
    from audit.actor import Actor

    make_user("viewer", "uma")
    client = Client()
    login(client, "uma", "bad")
    login(client, "uma", "bad")
    assert commands.is_locked("uma")
    assert commands.unlock(Actor.system(), "uma")
    assert login(client, "uma", PASSWORD).status_code == 302
    assert Event.objects.filter(type="auth.unlocked").count() == 1


def test_failures_for_unknown_users_are_recorded_per_address_not_per_name(db) -> None:
    login(Client(), "ghost", "x")
    event = Event.objects.get(type="auth.unknown_user_failed")
    assert (event.aggregate_type, event.aggregate_id) == ("login_source", "192.0.2.10")
    assert event.actor_type == "anonymous" and event.actor_name == ""
    assert not Event.objects.filter(type="auth.login_failed").exists()
