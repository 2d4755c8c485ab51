"""API tokens: hashed at rest, shown once, expiry, revocation, read-only, last use."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import APIToken
from audit.models import Event

pytestmark = pytest.mark.django_db


def bearer(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def test_token_is_shown_once_and_stored_only_as_a_digest(make_user) -> None:
    user = make_user("operator", "tina")
    client = APIClient()
    client.force_login(user)
    response = client.post("/api/v1/tokens/", {"name": "laptop", "expires_days": 30}, format="json")
    assert response.status_code == 201
    token = response.json()["token"]
    assert token.startswith("sbx_")
    row = APIToken.objects.get(user=user)
    secret = token.split("_", 2)[2]
    assert secret not in row.digest and token not in str(
        APIToken.objects.filter(pk=row.pk).values().get()
    )
    listing = client.get("/api/v1/tokens/").json()
    assert listing["count"] == 1 and "token" not in listing["results"][0]
    # The event names the token, never its secret or digest.
    created = Event.objects.get(type="token.created")
    assert secret not in created.data and row.digest not in created.data
    assert created.payload["token_id"] == row.key
    assert bearer(token).get("/api/v1/me/").json()["username"] == "tina"


def test_expired_token_is_refused_and_recorded(make_user, issue_token) -> None:
    user = make_user("operator")
    token = issue_token(user, expires_days=1)
    APIToken.objects.filter(user=user).update(expires_at=timezone.now() - timedelta(seconds=1))
    response = bearer(token).get("/api/v1/me/")
    assert response.status_code == 401
    assert response.json()["detail"] == "Token expired."
    rejected = Event.objects.filter(type="auth.token_rejected").get()
    assert rejected.payload["reason"] == "expired"


def test_revoked_token_is_refused(make_user) -> None:
    user = make_user("operator")
    client = APIClient()
    client.force_login(user)
    created = client.post("/api/v1/tokens/", {"name": "t"}, format="json").json()
    assert bearer(created["token"]).get("/api/v1/me/").status_code == 200
    assert client.delete(f"/api/v1/tokens/{created['detail']['id']}/").status_code == 204
    response = bearer(created["token"]).get("/api/v1/me/")
    assert response.status_code == 401
    assert response.json()["detail"] == "Token revoked."
    assert Event.objects.filter(type="token.revoked").count() == 1


def test_wrong_secret_and_garbage_are_refused(make_user, issue_token) -> None:
    token = issue_token(make_user("operator"))
    key = token.split("_")[1]
    forged = f"sbx_{key}_{'A' * 43}"
    assert bearer(forged).get("/api/v1/me/").status_code == 401
    assert bearer("sbx_nonsense").get("/api/v1/me/").status_code == 401
    assert APIClient().get("/api/v1/me/", HTTP_AUTHORIZATION="Bearer").status_code == 401
    assert Event.objects.filter(type="auth.token_rejected").get().payload["reason"] == "bad_secret"


def test_repeated_rejections_are_recorded_once_a_minute(make_user, issue_token) -> None:
    user = make_user("operator")
    token = issue_token(user)
    APIToken.objects.filter(user=user).update(revoked_at=timezone.now())
    for _ in range(5):
        assert bearer(token).get("/api/v1/me/").status_code == 401
    assert Event.objects.filter(type="auth.token_rejected").count() == 1


def test_read_only_token_cannot_write(make_user, issue_token) -> None:
    token = issue_token(make_user("operator"), read_only=True)
    client = bearer(token)
    assert client.get("/api/v1/tokens/").status_code == 200
    response = client.post("/api/v1/tokens/", {"name": "escalate"}, format="json")
    assert response.status_code == 403
    assert response.json()["detail"] == "This API token is read-only."


def test_last_used_is_written_at_most_once_a_minute(make_user, issue_token) -> None:
    user = make_user("operator")
    client = bearer(issue_token(user))
    client.get("/api/v1/me/")
    first = APIToken.objects.get(user=user).last_used_at
    assert first is not None
    client.get("/api/v1/me/")
    assert APIToken.objects.get(user=user).last_used_at == first


def test_allowed_ips_are_enforced(make_user, issue_token) -> None:
    token = issue_token(make_user("operator"), allowed_ips=["10.0.0.0/8"])
    response = bearer(token).get("/api/v1/me/", REMOTE_ADDR="127.0.0.1")
    assert response.status_code == 401
    assert bearer(token).get("/api/v1/me/", REMOTE_ADDR="10.1.2.3").status_code == 200


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x", "expires_days": 0}, "expires_days"),
        ({"name": "x", "expires_days": 100000}, "expires_days"),
        ({"name": "x", "allowed_ips": ["not-an-ip"]}, "allowed_ips"),
    ],
)
def test_invalid_token_requests_get_field_errors_and_change_nothing(
    make_user, payload, field
) -> None:
    client = APIClient()
    client.force_login(make_user("operator"))
    before = Event.objects.count()
    response = client.post("/api/v1/tokens/", payload, format="json")
    assert response.status_code == 400
    assert field in response.json()
    assert APIToken.objects.count() == 0 and Event.objects.count() == before


def test_create_token_command_prints_a_working_token_once(make_user) -> None:
    make_user("viewer", "val")
    out, err = io.StringIO(), io.StringIO()
    call_command("create_token", "val", "--expires", "7", "--read-only", stdout=out, stderr=err)
    token = out.getvalue().strip()
    assert "shown only this once" in err.getvalue()
    row = APIToken.objects.get(user__username="val")
    assert row.read_only and (row.expires_at - timezone.now()).days in (6, 7)
    assert bearer(token).get("/api/v1/me/").json()["username"] == "val"


def test_users_cannot_see_or_revoke_each_others_tokens(make_user, issue_token) -> None:
    alice, bob = make_user("operator", "alice"), make_user("operator", "bob")
    issue_token(alice)
    bob_client = APIClient()
    bob_client.force_login(bob)
    assert bob_client.get("/api/v1/tokens/").json()["count"] == 0
    alice_token = APIToken.objects.get(user=alice)
    assert bob_client.delete(f"/api/v1/tokens/{alice_token.pk}/").status_code == 404
    assert APIToken.objects.get(pk=alice_token.pk).revoked_at is None


def test_me_tells_the_tokens_own_limits(make_user, issue_token) -> None:
    """A client learns what its token may do beside what its user may (the MCP server lists
    its tools from this)."""
    user = make_user("operator")
    token = issue_token(user, read_only=True, scopes=["vms.exec_vm", "vms.read_files"])
    me = bearer(token).get("/api/v1/me/").json()
    assert me["token"] == token.split("_")[1]
    assert me["token_read_only"] is True
    assert me["token_scopes"] == ["vms.exec_vm", "vms.read_files"]
    assert "vms.write_files" in me["permissions"]  # the user's, which the token narrows
    plain = bearer(issue_token(user)).get("/api/v1/me/").json()
    assert (plain["token_read_only"], plain["token_scopes"]) == (False, [])
    session = APIClient()
    session.force_login(user)
    mine = session.get("/api/v1/me/").json()
    assert (mine["token"], mine["token_read_only"], mine["token_scopes"]) == (None, None, None)
