"""Every operation of the OpenAPI schema, called with tokens that must not get through.

Generated from the schema, so a new endpoint is covered without editing this file: it must state
its token scope (``x-token-scopes``), and then a read-only token may not write through it, a
token scoped to a permission it does not accept is refused, and an IP-restricted token used from
elsewhere, an expired and a revoked token are refused, whatever the view's own permissions. The
user behind every token is an admin, so each refusal here is the token's, never the role's.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import APIToken
from accounts.scopes import READ_ONLY_MESSAGE, SCOPES
from audit.models import Event

pytestmark = pytest.mark.django_db


def changes() -> int:
    """Events other than refused token uses (which are recorded: see the test of that)."""
    return Event.objects.exclude(type="auth.token_rejected").count()


WRITE_METHODS = {"post", "put", "patch", "delete"}


def _operations() -> list[tuple[str, str, dict[str, Any]]]:
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    return [
        (method, path, op)
        for path, ops in sorted(schema["paths"].items())
        for method, op in sorted(ops.items())
        if method in {"get", "post", "put", "patch", "delete"}
    ]


OPERATIONS = _operations()
IDS = [f"{m.upper()} {p}" for m, p, _ in OPERATIONS]


@pytest.fixture
def world(make_user, issue_token) -> dict[str, Any]:
    from accounts.caller import Caller
    from vms import commands

    admin = make_user("admin", "walker")
    owner = make_user("operator", "owner")
    caller = Caller.for_user(owner, channel="api")
    accepted = commands.create(caller, name="t", template="linux-small")
    other_token = issue_token(owner, name="theirs")
    event = Event.objects.order_by("-position").first()
    assert event is not None
    ids = {
        "vms": str(accepted.vm.pk),
        "requests": str(accepted.request.event_id),
        "tokens": str(APIToken.objects.get(key=other_token.split("_")[1]).pk),
        "users": str(owner.pk),
        "events": str(event.position),
        "templates": "linux-small",
    }
    return {"admin": admin, "ids": ids}


def _url(path: str, ids: dict[str, str]) -> str:
    """The path with each parameter filled from the collection it follows (0 if unknown)."""

    def fill(match: re.Match[str]) -> str:
        collection = path[: match.start()].rstrip("/").rsplit("/", 1)[-1]
        return ids.get(collection, "0")

    return re.sub(r"\{[^}]+\}", fill, path)


def _call(client: APIClient, method: str, url: str) -> Any:
    if method in WRITE_METHODS:
        return getattr(client, method)(url, {}, format="json")
    return getattr(client, method)(url)


def _client(token: str, addr: str = "127.0.0.1") -> APIClient:
    client = APIClient(REMOTE_ADDR=addr)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def test_the_schema_has_operations_to_walk() -> None:
    assert len(OPERATIONS) > 30
    assert any(m == "post" and p.endswith("/tokens/") for m, p, _ in OPERATIONS)


@pytest.mark.parametrize(("method", "path", "op"), OPERATIONS, ids=IDS)
def test_operation_states_a_known_scope(method, path, op) -> None:
    assert "x-token-scopes" in op, f"{method.upper()} {path} states no token scope"
    unknown = set(op["x-token-scopes"]) - set(SCOPES)
    assert not unknown, f"{method.upper()} {path}: scopes no token can hold: {unknown}"
    if method in WRITE_METHODS:
        assert op["x-token-scopes"], f"{method.upper()} {path} is a write that needs no scope"


@pytest.mark.parametrize(("method", "path", "op"), OPERATIONS, ids=IDS)
def test_read_only_token(world, issue_token, method, path, op) -> None:
    client = _client(issue_token(world["admin"], read_only=True))
    before = changes()
    response = _call(client, method, _url(path, world["ids"]))
    if method in WRITE_METHODS:
        assert response.status_code == 403, (response.status_code, response.content[:300])
        assert response.json()["detail"] == READ_ONLY_MESSAGE
        assert changes() == before
    else:
        assert response.status_code not in (401, 403), response.content[:300]
        assert response.status_code < 500, response.content[:300]


@pytest.mark.parametrize(("method", "path", "op"), OPERATIONS, ids=IDS)
def test_token_scoped_to_one_permission(world, issue_token, method, path, op) -> None:
    accepted = set(op.get("x-token-scopes", ()))
    url = _url(path, world["ids"])
    if not accepted:  # needs no permission: any token may call it
        response = _call(_client(issue_token(world["admin"], scopes=[SCOPES[0]])), method, url)
        assert response.status_code not in (401, 403) and response.status_code < 500
        return
    # In scope, the role decides (the tests of each app); every other scope is refused.
    outside = [s for s in SCOPES if s not in accepted]
    tokens = {s: issue_token(world["admin"], scopes=[s], name=s) for s in outside}
    before = changes()
    for scope, token in tokens.items():
        response = _call(_client(token), method, url)
        assert response.status_code == 403, (scope, response.status_code, response.content[:300])
        assert "scope" in response.json()["detail"]
    assert changes() == before


@pytest.mark.parametrize(("method", "path", "op"), OPERATIONS, ids=IDS)
def test_token_from_another_address_expired_or_revoked(
    world, issue_token, method, path, op
) -> None:
    url = _url(path, world["ids"])
    elsewhere = issue_token(world["admin"], allowed_ips=["10.0.0.0/8"], name="net")
    expired = issue_token(world["admin"], name="expired")
    revoked = issue_token(world["admin"], name="revoked")
    APIToken.objects.filter(name="expired").update(expires_at=timezone.now() - timedelta(seconds=1))
    APIToken.objects.filter(name="revoked").update(revoked_at=timezone.now())
    before = changes()
    for token, detail in (
        (elsewhere, "Token not allowed from this address."),
        (expired, "Token expired."),
        (revoked, "Token revoked."),
    ):
        response = _call(_client(token, addr="192.0.2.7"), method, url)
        assert response.status_code == 401, (detail, response.status_code)
        assert response.json()["detail"] == detail
    # No credentials at all: refused too.
    assert _call(APIClient(), method, url).status_code in (401, 403)
    assert changes() == before
