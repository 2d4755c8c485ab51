"""Every way to change a password records it (user.password_changed, never the password)."""

from __future__ import annotations

import io

import pytest
from django.contrib.auth import authenticate
from django.core.management import call_command, get_commands
from django.test import Client

from accounts import commands
from accounts.models import User
from audit.actor import Actor
from audit.models import Event

pytestmark = pytest.mark.django_db

PASSWORD = "pw-Long-enough-1"
NEW = "a-New-password-42"


def test_the_django_admin_password_page_records_the_change(make_user) -> None:
    make_user("admin", "boss")
    client = Client()
    assert client.login(username="boss", password=PASSWORD)
    response = client.post(
        "/admin/password_change/",
        {"old_password": PASSWORD, "new_password1": NEW, "new_password2": NEW},
    )
    assert response.status_code == 302, response.content[:2000]
    assert User.objects.get(username="boss").check_password(NEW)
    event = Event.objects.get(type="user.password_changed")
    assert event.payload == {"username": "boss", "by_self": True}
    assert NEW not in event.data and event.actor_name == "boss"
    # The session that changed it stays logged in.
    assert client.get("/admin/").status_code == 200


def test_a_refused_new_password_changes_nothing(make_user) -> None:
    make_user("admin", "boss")
    client = Client()
    assert client.login(username="boss", password=PASSWORD)
    response = client.post(
        "/admin/password_change/",
        {"old_password": PASSWORD, "new_password1": "short", "new_password2": "short"},
    )
    assert response.status_code == 200
    assert User.objects.get(username="boss").check_password(PASSWORD)
    assert not Event.objects.filter(type="user.password_changed").exists()


def test_manage_py_changepassword_is_ours_and_records_the_change(make_user, monkeypatch) -> None:
    assert get_commands()["changepassword"] == "accounts.shell"
    make_user("operator", "olga")
    answers = iter([NEW, NEW])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    call_command("changepassword", "olga", stdout=io.StringIO(), stderr=io.StringIO())
    assert authenticate(username="olga", password=NEW) is not None
    event = Event.objects.get(type="user.password_changed")
    assert event.payload["username"] == "olga"
    assert (event.channel, event.actor_name) == ("shell", "changepassword")


def test_changing_another_users_password_needs_manage_users(make_user) -> None:
    viewer, other = make_user("viewer"), make_user("operator")
    with pytest.raises(commands.PermissionDenied):
        commands.change_password(Actor.for_user(viewer), other, NEW, by=viewer)
    assert not Event.objects.filter(type="user.password_changed").exists()
