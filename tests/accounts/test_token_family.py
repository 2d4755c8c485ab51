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


def test_deactivating_a_user_revokes_its_tokens_and_their_families(make_user) -> None:
    """Each token of a deactivated user is revoked as revoke_token revokes it: a token.revoked
    event each, and the tokens it issued (here for another user) along with it."""
    admin = make_user("admin", "issuer")
    other_admin = make_user("admin", "other-admin")
    operator = make_user("operator", "holder")
    shell = Actor.system()
    own = commands.create_token(shell, admin, name="own")
    issued = commands.create_token(
        shell, operator, name="issued-for-holder", by=admin, parent=own.token
    )
    grandchild = issue_with(issued.plaintext, "grandchild")
    kept = commands.create_token(shell, operator, name="holder-own")
    commands.set_active(shell, admin, False, by=other_admin)
    for plaintext in (own.plaintext, issued.plaintext, grandchild):
        assert bearer(plaintext).get("/api/v1/me/").status_code == 401
    assert bearer(kept.plaintext).get("/api/v1/me/").status_code == 200
    revoked = {e.aggregate_id: e.payload for e in Event.objects.filter(type="token.revoked")}
    grand = APIToken.objects.get(name="grandchild")
    assert set(revoked) == {own.token.key, issued.token.key, grand.key}
    assert revoked[issued.token.key]["revoked_with"] == own.token.key
    assert revoked[grand.key]["username"] == "holder"
    assert not APIToken.objects.filter(user=admin, revoked_at__isnull=True).exists()
