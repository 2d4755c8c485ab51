"""Revoking a token revokes every token it issued, and theirs."""

from __future__ import annotations

import pytest
from django.core.exceptions import PermissionDenied
from rest_framework.test import APIClient

from accounts import commands
from accounts.models import APIToken
from audit.actor import Actor
from audit.models import Event

pytestmark = pytest.mark.django_db


def bearer(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def issue_with(token: str, name: str) -> str:
    response = bearer(token).post("/api/v1/tokens/", {"name": name}, format="json")
    assert response.status_code == 201, response.content
    return response.json()["token"]


def test_revoking_a_parent_revokes_its_child_and_grandchild(make_user, issue_token) -> None:
    user = make_user("operator")
    parent = issue_token(user, name="parent")
    child = issue_with(parent, "child")
    grandchild = issue_with(child, "grandchild")
    sibling = issue_token(user, name="unrelated")
    tokens = {t.name: t for t in APIToken.objects.filter(user=user)}
    assert tokens["child"].parent == tokens["parent"]
    assert tokens["grandchild"].parent == tokens["child"]
    # A leaked parent cannot keep its line alive: revoking it (here with itself) ends all three.
    assert bearer(parent).delete(f"/api/v1/tokens/{tokens['parent'].pk}/").status_code == 204
    for plaintext in (parent, child, grandchild):
        assert bearer(plaintext).get("/api/v1/me/").status_code == 401
    assert bearer(sibling).get("/api/v1/me/").status_code == 200
    revoked = {e.aggregate_id: e.payload for e in Event.objects.filter(type="token.revoked")}
    assert set(revoked) == {tokens[n].key for n in ("parent", "child", "grandchild")}
    assert "revoked_with" not in revoked[tokens["parent"].key]
    assert revoked[tokens["grandchild"].key]["revoked_with"] == tokens["parent"].key
    # Revoking again records nothing.
    assert not commands.revoke_token(Actor.system(), tokens["parent"])
    assert Event.objects.filter(type="token.revoked").count() == 3


def test_revoking_a_child_leaves_its_parent(make_user, issue_token) -> None:
    user = make_user("operator")
    parent = issue_token(user, name="parent")
    child = issue_with(parent, "child")
    grandchild = issue_with(child, "grandchild")
    key = APIToken.objects.get(name="child").pk
    assert bearer(parent).delete(f"/api/v1/tokens/{key}/").status_code == 204
    assert bearer(parent).get("/api/v1/me/").status_code == 200
    assert bearer(grandchild).get("/api/v1/me/").status_code == 401


def test_a_revoked_token_issues_nothing(make_user) -> None:
    user = make_user("operator")
    issued = commands.create_token(Actor.system(), user, name="parent")
    commands.revoke_token(Actor.system(), issued.token)
    with pytest.raises(PermissionDenied, match="revoked or expired"):
        commands.create_token(Actor.system(), user, name="late", by=user, parent=issued.token)
    assert APIToken.objects.filter(user=user).count() == 1
