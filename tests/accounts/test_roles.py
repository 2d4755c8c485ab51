"""Roles and the superuser flag are one thing, changed together with their event; creating users
answers bad input with field errors."""

from __future__ import annotations

import io

import pytest
from django.apps import apps
from django.core.management import call_command
from django.core.management.base import CommandError
from rest_framework.test import APIClient

from accounts import commands
from accounts.models import User
from audit.actor import Actor
from audit.models import Event

pytestmark = pytest.mark.django_db

PASSWORD = "pw-Long-enough-1"


def shell_user(username: str, role: str) -> User:
    call_command(
        "create_sandbox_user",
        username,
        "--role",
        role,
        "--password",
        PASSWORD,
        stdout=io.StringIO(),
    )
    return User.objects.get(username=username)


def admin_client(make_user) -> APIClient:
    client = APIClient()
    client.force_authenticate(make_user("admin", "boss"))
    return client


def test_demoting_a_shell_made_admin_removes_its_superuser_power(make_user) -> None:
    root = shell_user("root2", "admin")
    assert root.is_superuser and root.is_staff
    response = admin_client(make_user).post(
        f"/api/v1/users/{root.pk}/role/", {"role": "viewer"}, format="json"
    )
    assert response.status_code == 200
    assert response.json()["role"] == "viewer"
    root = User.objects.get(pk=root.pk)
    assert (root.role, root.is_superuser, root.is_staff) == ("viewer", False, False)
    assert not root.has_perm("accounts.manage_users")
    assert not root.has_perm("vms.exec_vm")
    event = Event.objects.filter(type="user.role_changed").get()
    assert (event.payload["from"], event.payload["to"]) == ("admin", "viewer")
    # Its power is gone on the API too.
    demoted = APIClient()
    demoted.force_authenticate(root)
    assert demoted.get("/api/v1/users/").status_code == 403


def test_promoting_to_admin_makes_a_superuser_in_the_same_change(make_user) -> None:
    person = make_user("operator", "olga")
    assert not person.is_superuser
    response = admin_client(make_user).post(
        f"/api/v1/users/{person.pk}/role/", {"role": "admin"}, format="json"
    )
    assert response.status_code == 200 and response.json()["role"] == "admin"
    person = User.objects.get(pk=person.pk)
    assert person.is_superuser and person.is_staff and person.role == "admin"
    event = Event.objects.get(type="user.role_changed")
    assert (event.payload["from"], event.payload["to"]) == ("operator", "admin")


def test_a_role_change_that_fails_changes_nothing_and_records_nothing(make_user) -> None:
    person = shell_user("root3", "admin")
    admin = make_user("admin", "boss")
    before = Event.objects.count()
    with pytest.raises(RuntimeError), pytest.MonkeyPatch.context() as mp:

        def fail(*args, **kwargs):
            raise RuntimeError("store down")

        mp.setattr(commands.store, "append", fail)
        commands.set_role(Actor.for_user(admin), person, "viewer", by=admin)
    person = User.objects.get(pk=person.pk)
    assert (person.role, person.is_superuser) == ("admin", True)
    assert Event.objects.count() == before


@pytest.mark.parametrize("role", ["admin", "operator", "viewer", "auditor"])
def test_every_creation_path_makes_the_superuser_flag_follow_the_role(make_user, role) -> None:
    made = [shell_user(f"shell-{role}", role), make_user(role, f"cmd-{role}")]
    response = admin_client(make_user).post(
        "/api/v1/users/",
        {"username": f"api-{role}", "role": role, "password": PASSWORD},
        format="json",
    )
    assert response.status_code == 201, response.content
    made.append(User.objects.get(username=f"api-{role}"))
    for user in made:
        assert (user.role, user.is_superuser, user.is_staff) == (
            role,
            role == "admin",
            role == "admin",
        )


def test_bootstrap_admin_is_a_superuser_admin(settings, tmp_path) -> None:
    settings.DATA_DIR = tmp_path
    call_command("bootstrap_admin", "--username", "first", stdout=io.StringIO())
    first = User.objects.get(username="first")
    assert (first.role, first.is_superuser) == ("admin", True)
    assert Event.objects.get(type="user.created").payload["superuser"] is True


@pytest.mark.parametrize(
    ("host", "port", "shown"),
    [
        ("127.0.0.1", 8000, "http://127.0.0.1:8000/accounts/login/"),
        ("0.0.0.0", 9123, "http://127.0.0.1:9123/accounts/login/"),
        ("::", 8443, "http://[::1]:8443/accounts/login/"),
        ("sandbox.example.com", 80, "http://sandbox.example.com:80/accounts/login/"),
    ],
)
def test_bootstrap_admin_names_where_serve_listens(settings, tmp_path, host, port, shown) -> None:
    settings.DATA_DIR, settings.SANDBOX_HOST, settings.SANDBOX_PORT = tmp_path, host, port
    out = io.StringIO()
    call_command("bootstrap_admin", stdout=out)
    assert f"Log in at {shown} as admin" in out.getvalue()
    again = io.StringIO()  # a later run: the same place, and where the password is kept
    call_command("bootstrap_admin", stdout=again)
    assert f"Log in at {shown} as admin with the password in" in again.getvalue()


def test_bootstrap_admin_refuses_a_weak_password_cleanly(settings, tmp_path, monkeypatch) -> None:
    settings.DATA_DIR = tmp_path
    monkeypatch.setenv("SANDBOX_ADMIN_PASSWORD", "password")
    with pytest.raises(CommandError, match="too common"):
        call_command("bootstrap_admin", "--username", "first", stdout=io.StringIO())
    assert not User.objects.exists() and not Event.objects.exists()


def test_createsuperuser_is_refused_in_favour_of_the_admin_role(db) -> None:
    with pytest.raises(CommandError, match="create_sandbox_user"):
        call_command(
            "createsuperuser",
            "--noinput",
            "--username",
            "sneaky",
            "--email",
            "s@example.com",
            stdout=io.StringIO(),
            stderr=io.StringIO(),
        )
    assert not User.objects.filter(username="sneaky").exists()


def test_the_migration_brings_existing_flags_in_line_with_the_role(make_user, tamper) -> None:
    from importlib import import_module

    migration = import_module("accounts.migrations.0004_superuser_follows_role")
    demoted = make_user("viewer", "was-admin")
    User.objects.filter(pk=demoted.pk).update(is_superuser=True, is_staff=True)
    roleless = User.objects.create(username="made-outside", is_superuser=True, is_staff=True)
    admin = make_user("admin", "still-admin")
    migration.superuser_follows_role(apps, None)
    demoted, roleless, admin = (User.objects.get(pk=u.pk) for u in (demoted, roleless, admin))
    assert (demoted.role, demoted.is_superuser, demoted.is_staff) == ("viewer", False, False)
    assert (roleless.role, roleless.is_superuser) == ("admin", True)
    assert (admin.role, admin.is_superuser) == ("admin", True)


# --- POST /api/v1/users/: bad input is a 400 with field errors, never a 500 -------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"username": "nopw", "role": "viewer"}, "password"),
        ({"username": "short", "role": "viewer", "password": "x"}, "password"),
        ({"username": "common", "role": "viewer", "password": "password123"}, "password"),
        ({"role": "viewer", "password": PASSWORD}, "username"),
        ({"username": "bad name!", "role": "viewer", "password": PASSWORD}, "username"),
        ({"username": "x" * 151, "role": "viewer", "password": PASSWORD}, "username"),
        ({"username": "norole", "password": PASSWORD}, "role"),
        ({"username": "badrole", "role": "root", "password": PASSWORD}, "role"),
        ({"username": "bademail", "role": "viewer", "password": PASSWORD, "email": "x"}, "email"),
        ({"username": ["a"], "role": "viewer", "password": PASSWORD}, "username"),
    ],
)
def test_creating_a_user_with_bad_input_is_a_400_naming_the_field(make_user, body, field) -> None:
    client = admin_client(make_user)
    before = (User.objects.count(), Event.objects.count())
    response = client.post("/api/v1/users/", body, format="json")
    assert response.status_code == 400, response.content
    assert response["Content-Type"].startswith("application/json")
    assert field in response.json()
    assert (User.objects.count(), Event.objects.count()) == before


def test_creating_a_user_whose_name_is_taken_is_a_400(make_user) -> None:
    make_user("viewer", "taken")
    response = admin_client(make_user).post(
        "/api/v1/users/", {"username": "taken", "role": "viewer", "password": PASSWORD}
    )
    assert response.status_code == 400 and "username" in response.json()


def test_a_null_password_makes_an_account_for_tokens_only(make_user) -> None:
    response = admin_client(make_user).post(
        "/api/v1/users/", {"username": "bot", "role": "operator", "password": None}, format="json"
    )
    assert response.status_code == 201, response.content
    assert not User.objects.get(username="bot").has_usable_password()


def test_a_user_without_email_reads_as_null_not_an_empty_string(make_user) -> None:
    client = admin_client(make_user)
    response = client.post(
        "/api/v1/users/",
        {"username": "mailless", "role": "viewer", "password": PASSWORD, "email": ""},
        format="json",
    )
    assert response.status_code == 201 and response.json()["email"] is None
    listed = {u["username"]: u for u in client.get("/api/v1/users/").json()["results"]}
    assert listed["mailless"]["email"] is None
    assert client.get("/api/v1/me/").json()["email"] is None


def test_the_schema_declares_user_email_nullable(make_user) -> None:
    schema = admin_client(make_user).get("/api/v1/schema/", HTTP_ACCEPT="application/json").json()
    email = schema["components"]["schemas"]["User"]["properties"]["email"]
    assert email.get("format") == "email" and email.get("nullable") is True


def test_the_django_admin_cannot_edit_roles(make_user) -> None:
    from django.contrib.auth.models import Group
    from django.test import Client

    client = Client()
    client.force_login(make_user("admin", "boss"))
    assert client.get("/admin/").status_code == 200  # admins are staff: the read-only admin
    viewer = Group.objects.get(name="viewer")
    perms_before = set(viewer.permissions.values_list("pk", flat=True))
    assert client.get("/admin/auth/group/add/").status_code == 403
    response = client.post(
        f"/admin/auth/group/{viewer.pk}/change/", {"name": "viewer", "permissions": []}
    )
    assert response.status_code == 403
    assert set(viewer.permissions.values_list("pk", flat=True)) == perms_before


def test_the_dashboard_role_change_demotes_the_superuser_and_says_the_real_role(make_user) -> None:
    from django.test import Client

    root = shell_user("root4", "admin")
    client = Client()
    client.force_login(make_user("admin", "boss"))
    response = client.post(f"/accounts/users/{root.pk}/role/", {"role": "auditor"}, follow=True)
    assert "root4 is now auditor." in response.content.decode()
    root = User.objects.get(pk=root.pk)
    assert (root.role, root.is_superuser, root.is_staff) == ("auditor", False, False)
