"""What auditors do is in the log: reading the trail, downloading exports, listing accounts; and
an export over a broken chain is refused with an event naming the break (issue 11, item 6)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test import Client

from audit.models import Event, ExportJob
from tests.audit_exports.mix import Mix

pytestmark = pytest.mark.django_db


def _period() -> dict[str, str]:
    now = datetime.now(UTC)
    return {
        "since": (now - timedelta(hours=1)).isoformat(),
        "until": (now + timedelta(hours=1)).isoformat(),
    }


def _login(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _last(event_type: str) -> Event:
    return Event.objects.filter(type=event_type).latest("position")


def test_reading_the_trail_through_the_api_is_one_event_per_request(mix: Mix, token_client) -> None:
    client = token_client(mix.auditor)
    before = Event.objects.filter(type="audit.trail_read").count()
    response = client.get("/api/v1/events/", {"type": "auth.login_failed"})
    assert response.status_code == 200
    returned = [e["position"] for e in response.json()["results"]]
    assert Event.objects.filter(type="audit.trail_read").count() == before + 1
    read = _last("audit.trail_read")
    assert read.actor_name == mix.auditor.username and read.token_id
    assert read.payload["what"] == "api.events.list"
    assert read.payload["filters"] == {"type": "auth.login_failed"}
    assert read.payload["returned"] == len(returned) == 5
    assert read.payload["first_position"] == min(returned)
    client.get(f"/api/v1/events/{returned[0]}/")
    assert _last("audit.trail_read").payload == {
        "what": "api.events.retrieve",
        "position": returned[0],
    }


def test_reading_the_trail_on_the_dashboard_is_an_event(mix: Mix) -> None:
    client = _login(mix.auditor)
    assert client.get("/audit/", {"actor": mix.operator.username}).status_code == 200
    read = _last("audit.trail_read")
    assert read.payload["what"] == "dashboard.trail" and read.channel == "dashboard"
    assert read.payload["filters"] == {"actor": mix.operator.username, "page": "1"}
    assert client.get("/audit/events/3/").status_code == 200
    assert _last("audit.trail_read").payload == {"what": "dashboard.event", "position": 3}
    assert client.get("/audit/sessions/").status_code == 200
    assert _last("audit.trail_read").payload["what"] == "dashboard.sessions"


def test_downloading_an_export_is_an_event_with_its_sha256(mix: Mix, token_client) -> None:
    client = token_client(mix.auditor)
    job = client.post(
        "/api/v1/audit/reports/", {"framework": "hipaa", "format": "csv", **_period()}
    ).json()
    assert not Event.objects.filter(type="audit.export_downloaded").exists()
    response = client.get(job["download_url"])
    assert response.status_code == 200
    downloaded = _last("audit.export_downloaded")
    assert downloaded.actor_name == mix.auditor.username
    assert downloaded.payload["job"] == job["id"] and downloaded.payload["sha256"] == job["sha256"]
    dashboard = _login(mix.admin).get(f"/audit/exports/{job['id']}/download/")
    assert dashboard.status_code == 200
    assert _last("audit.export_downloaded").actor_name == mix.admin.username
    assert Event.objects.filter(type="audit.export_downloaded").count() == 2


def test_an_export_over_a_broken_chain_is_refused_with_an_event_naming_the_break(
    mix: Mix, token_client, tamper
) -> None:
    client = token_client(mix.auditor)
    target = Event.objects.filter(type="vm.started").order_by("position").first()
    assert target is not None
    with tamper(), connection.cursor() as cur:
        cur.execute(
            "UPDATE audit_event SET actor_name = 'mallory' WHERE position = %s", [target.position]
        )
    exported = Event.objects.filter(type="audit.exported").count()
    for url, body in (
        ("/api/v1/audit/reports/", {"framework": "soc2", "format": "json", **_period()}),
        ("/api/v1/audit/bundles/", _period()),
    ):
        response = client.post(url, body, format="json")
        assert response.status_code == 409, response.content
        assert f"position {target.position}: altered" in response.json()["detail"]
        refused = _last("audit.export_refused")
        assert f"position {target.position}: altered" in refused.payload["problem"]
        assert refused.actor_name == mix.auditor.username
        job = ExportJob.objects.get(pk=response.json()["job"]["id"])
        assert job.status == "failed" and not job.sha256
    assert Event.objects.filter(type="audit.exported").count() == exported


def test_auditors_list_users_roles_and_tokens_read_only(mix: Mix, token_client) -> None:
    client = token_client(mix.auditor)
    response = client.get("/api/v1/audit/access/")
    assert response.status_code == 200, response.content
    review = response.json()
    users = {u["username"]: u for u in review["users"]}
    assert users[mix.admin.username]["role"] == "admin"
    assert users[mix.operator.username]["role"] == "operator"
    assert {r["role"] for r in review["roles"]} >= {"admin", "operator", "viewer", "auditor"}
    tokens = {t["name"]: t for t in review["tokens"]}
    assert tokens["ci-0"]["username"] == mix.operator.username and tokens["ci-0"]["active"]
    assert "scopes" in tokens["ci-0"] and "read_only" in tokens["ci-0"]
    assert any(c["type"] == "user.role_changed" for c in review["changes"])
    listed = _last("audit.accounts_listed")
    assert listed.actor_name == mix.auditor.username and listed.payload["what"] == "api.access"
    assert client.post("/api/v1/audit/access/", {}).status_code == 405
    page = _login(mix.auditor).get("/audit/access/")
    assert page.status_code == 200 and mix.operator.username in page.content.decode()
    assert _last("audit.accounts_listed").payload["what"] == "dashboard.access"


def test_a_bad_access_review_moment_is_a_field_error(mix: Mix, token_client) -> None:
    client = token_client(mix.auditor)
    listed = Event.objects.filter(type="audit.accounts_listed").count()
    response = client.get("/api/v1/audit/access/", {"at": "yesterday"})
    assert response.status_code == 400 and "at" in response.json()
    response = client.get("/api/v1/audit/access/", {"at": "2026-01-01", "since": "2026-02-01"})
    assert response.status_code == 400 and "since" in response.json()
    assert Event.objects.filter(type="audit.accounts_listed").count() == listed


@pytest.mark.parametrize("role", ["viewer", "operator"])
def test_others_cannot_list_access(make_user, token_client, role: str) -> None:
    client = token_client(make_user(role))
    assert client.get("/api/v1/audit/access/").status_code == 403
    assert _login(make_user(role)).get("/audit/access/").status_code == 403


def test_auditors_list_the_live_accounts_and_their_differences_from_the_log(
    mix: Mix, token_client
) -> None:
    from django.contrib.auth.models import Group

    from accounts.models import User

    client = token_client(mix.auditor)
    clean = client.get("/api/v1/audit/accounts/")
    assert clean.status_code == 200, clean.content
    body = clean.json()
    assert body["differences_from_log"] == []
    users = {u["username"]: u for u in body["users"]}
    assert users[mix.viewer.username]["role"] == "viewer"
    tokens = {t["name"]: t for t in body["tokens"]}
    assert tokens["ci-0"]["active"] and "digest" not in tokens["ci-0"]
    assert _last("audit.accounts_listed").payload["what"] == "api.accounts"
    # Changes made around the command functions, so around the log, show as differences.
    ghost = User.objects.create(username="ghost")
    ghost.groups.set([Group.objects.get(name="admin")])
    mix.viewer.groups.set([Group.objects.get(name="operator")])
    differences = client.get("/api/v1/audit/accounts/").json()["differences_from_log"]
    assert "user ghost: in the database, never created in the log" in differences
    assert f"user {mix.viewer.username}: role operator, the log says viewer" in differences
    assert client.post("/api/v1/audit/accounts/", {}).status_code == 405
    page = _login(mix.auditor).get("/audit/accounts/")
    assert page.status_code == 200 and "ghost: in the database" in page.content.decode()
    assert _last("audit.accounts_listed").payload["what"] == "dashboard.accounts"


@pytest.mark.parametrize("role", ["viewer", "operator"])
def test_others_cannot_list_the_live_accounts(make_user, token_client, role: str) -> None:
    assert token_client(make_user(role)).get("/api/v1/audit/accounts/").status_code == 403
    assert _login(make_user(role)).get("/audit/accounts/").status_code == 403
