"""What a scoped token may grant, that the last admin stays, and that token rejections stay rare
whatever the reasons."""

from __future__ import annotations

import threading

import pytest
from django.db import connection, connections
from rest_framework.test import APIClient

from accounts import commands
from accounts.models import APIToken, User
from audit.actor import Actor
from audit.models import Event

PASSWORD = "pw-Long-enough-1"
SHELL = Actor.system(channel="shell", name="tests")


def bearer(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


@pytest.mark.django_db
def test_a_token_scoped_to_manage_users_cannot_make_or_promote_an_admin(
    make_user, issue_token
) -> None:
    boss = make_user("admin", "boss")
    client = bearer(issue_token(boss, scopes=["accounts.manage_users"]))
    before = User.objects.count()
    response = client.post(
        "/api/v1/users/",
        {"username": "pwned", "password": PASSWORD, "role": "admin"},
        format="json",
    )
    assert response.status_code == 403, response.content
    assert "use a token without scopes" in response.json()["detail"]
    assert User.objects.count() == before
    # Nor another role beyond its scopes (an operator drives VMs).
    response = client.post(
        "/api/v1/users/",
        {"username": "driver", "password": PASSWORD, "role": "operator"},
        format="json",
    )
    assert response.status_code == 403
    victim = make_user("viewer", "victim")
    response = client.post(f"/api/v1/users/{victim.pk}/role/", {"role": "admin"}, format="json")
    assert response.status_code == 403
    assert User.objects.get(pk=victim.pk).is_superuser is False
    assert not Event.objects.filter(type="user.role_changed").exists()
    # Nor take the admin role away (the admins are beyond it too).
    other = make_user("admin", "other-admin")
    response = client.post(f"/api/v1/users/{other.pk}/role/", {"role": "viewer"}, format="json")
    assert response.status_code == 403
    assert User.objects.get(pk=other.pk).is_superuser


@pytest.mark.django_db
def test_a_token_whose_scopes_cover_the_role_may_grant_it(make_user, issue_token) -> None:
    boss = make_user("admin", "boss")
    scopes = ["accounts.manage_users", "vms.view_virtualmachine", "vms.view_snapshot"]
    client = bearer(issue_token(boss, scopes=scopes))
    response = client.post(
        "/api/v1/users/",
        {"username": "watcher", "password": PASSWORD, "role": "viewer"},
        format="json",
    )
    assert response.status_code == 201, response.content
    # An unscoped token (or a session) may make an admin.
    response = bearer(issue_token(boss)).post(
        "/api/v1/users/",
        {"username": "second", "password": PASSWORD, "role": "admin"},
        format="json",
    )
    assert response.status_code == 201


@pytest.mark.django_db
def test_the_last_active_admin_is_not_demoted_nor_deactivated(make_user) -> None:
    only = make_user("admin", "only-admin")
    with pytest.raises(commands.Conflict, match="last active admin"):
        commands.set_role(SHELL, only, "viewer")
    with pytest.raises(commands.Conflict, match="last active admin"):
        commands.set_active(SHELL, only, False)
    assert User.objects.get(pk=only.pk).is_superuser
    assert not Event.objects.filter(type__in=["user.role_changed", "user.deactivated"]).exists()
    second = make_user("admin", "second-admin")
    client = APIClient()
    client.force_authenticate(second)
    assert client.post(f"/api/v1/users/{only.pk}/role/", {"role": "viewer"}).status_code == 200
    # The remaining admin cannot demote itself, nor be demoted from the shell.
    assert client.post(f"/api/v1/users/{second.pk}/role/", {"role": "viewer"}).status_code == 403
    with pytest.raises(commands.Conflict):
        commands.set_role(SHELL, second, "viewer")


@pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks need a server database")
@pytest.mark.django_db(transaction=True)
def test_two_admins_demoting_each_other_at_once_leave_one_admin(make_user, monkeypatch) -> None:
    first, second = make_user("admin", "admin-a"), make_user("admin", "admin-b")
    # Both changes reach the write together if nothing holds one back (a barrier that gives up
    # after a while when the other is waiting for a lock instead).
    meet = threading.Barrier(2, timeout=3)
    apply_role = commands._apply_role

    def slow_apply(user, role):
        try:
            meet.wait()
        except threading.BrokenBarrierError:
            pass
        apply_role(user, role)

    monkeypatch.setattr(commands, "_apply_role", slow_apply)
    outcomes: dict[str, str] = {}

    def demote(by: User, target: User) -> None:
        try:
            commands.set_role(Actor.for_user(by), target, "viewer", by=by)
            outcomes[by.username] = "done"
        except Exception as exc:
            outcomes[by.username] = type(exc).__name__
        finally:
            connections.close_all()

    threads = [
        threading.Thread(target=demote, args=(first, second)),
        threading.Thread(target=demote, args=(second, first)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes.values()) == ["PermissionDenied", "done"], outcomes
    assert User.objects.filter(is_superuser=True, is_active=True).count() == 1
    assert Event.objects.filter(type="user.role_changed").count() == 1


@pytest.mark.django_db
def test_alternating_rejection_reasons_add_one_event_per_reason_a_minute(
    make_user, issue_token
) -> None:
    user = make_user("operator")
    issue_token(user)
    token = APIToken.objects.get(user=user)
    for _ in range(5):
        for reason in ("read_only", "out_of_scope"):
            commands.record_token_rejected(Actor.anonymous(user.username), token, reason)
    reasons = sorted(e.payload["reason"] for e in Event.objects.filter(type="auth.token_rejected"))
    assert reasons == ["out_of_scope", "read_only"]


@pytest.mark.django_db
def test_alternating_refusals_over_http_add_one_event_per_reason(make_user, issue_token) -> None:
    client = bearer(issue_token(make_user("operator"), read_only=True, scopes=["vms.exec_vm"]))
    for _ in range(4):
        assert client.post("/api/v1/tokens/", {"name": "x"}, format="json").status_code == 403
        assert client.get("/api/v1/events/").status_code == 403
    reasons = sorted(e.payload["reason"] for e in Event.objects.filter(type="auth.token_rejected"))
    assert reasons == ["out_of_scope", "read_only"]
