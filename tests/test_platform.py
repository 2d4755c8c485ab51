"""The API base, health endpoints, metrics, request ids and structured logs."""

from __future__ import annotations

import json
import logging

import pytest
from django.test import Client
from rest_framework.test import APIClient

from audit.models import Event

pytestmark = pytest.mark.django_db


def test_openapi_schema_and_docs_are_served(make_user) -> None:
    client = APIClient()
    client.force_login(make_user("viewer"))
    schema = client.get("/api/v1/schema/", HTTP_ACCEPT="application/json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert "/api/v1/tokens/" in paths and "/api/v1/events/" in paths
    docs = client.get("/api/v1/docs/")
    assert docs.status_code == 200 and b"swagger" in docs.content.lower()


def test_api_requires_authentication() -> None:
    response = APIClient().get("/api/v1/me/")
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_healthz_and_readyz() -> None:
    from django.utils import timezone

    from vms import heartbeat

    client = Client()
    assert client.get("/healthz").json() == {"status": "ok"}
    # A worker cluster that started and whose worker took a heartbeat just now.
    heartbeat.started(timezone.now())
    heartbeat.beat(heartbeat.queue_name(), timezone.now().isoformat())
    ready = client.get("/readyz")
    body = ready.json()
    assert ready.status_code == 200, body
    assert set(body["checks"]) == {"database", "broker", "channel_layer", "worker"}
    assert all(c["ok"] for c in body["checks"].values())


def test_readyz_is_not_ready_without_a_worker_taking_heartbeats(settings) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from vms import heartbeat

    client = Client()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert "no worker cluster has started" in response.json()["checks"]["worker"]["error"]
    long_ago = timezone.now() - timedelta(seconds=settings.SANDBOX_WORKER_STALE_S + 5)
    heartbeat.started(long_ago)
    heartbeat.beat(heartbeat.queue_name(), long_ago.isoformat())
    from vms.models import WorkerHeartbeat

    WorkerHeartbeat.objects.update(beat_at=long_ago)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert "no worker has taken a heartbeat task" in response.json()["checks"]["worker"]["error"]


def test_readyz_reports_a_broken_dependency(settings) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    response = Client().get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["broker"]["ok"] is False


def test_metrics_exposes_event_store_and_requests(make_user) -> None:
    make_user("viewer")
    client = Client()
    client.get("/healthz")
    text = client.get("/metrics").content.decode()
    assert "sandbox_event_store_head_position 1.0" in text
    assert 'sandbox_http_requests_total{kind="health",method="GET",status="2xx"}' in text
    assert 'sandbox_projection_lag_events{projection="audit.activity"}' in text


def test_request_id_is_returned_and_lands_on_events(make_user) -> None:
    user = make_user("operator")
    client = APIClient()
    client.force_login(user)
    response = client.post(
        "/api/v1/tokens/", {"name": "r"}, format="json", HTTP_X_REQUEST_ID="abc-123-def-456"
    )
    assert response["X-Request-ID"] == "abc-123-def-456"
    event = Event.objects.get(type="token.created")
    assert (event.request_id, event.correlation_id, event.channel) == (
        "abc-123-def-456",
        "abc-123-def-456",
        "api",
    )
    # A hostile header is replaced, not trusted.
    other = client.get("/api/v1/me/", HTTP_X_REQUEST_ID="bad id; drop table")
    assert other["X-Request-ID"] != "bad id; drop table" and len(other["X-Request-ID"]) == 32


def test_token_events_carry_the_token_id(make_user, issue_token) -> None:
    user = make_user("operator")
    token = issue_token(user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    client.post("/api/v1/tokens/", {"name": "second"}, format="json")
    event = Event.objects.filter(type="token.created").order_by("-position").first()
    assert event.token_id == token.split("_")[1]
    assert token.split("_", 2)[2] not in json.dumps(list(Event.objects.values()), default=str)


def test_json_logs_carry_the_request_id(make_user) -> None:
    from pythonjsonlogger.json import JsonFormatter

    from core import context
    from core.logging import ContextFilter

    records: list[str] = []
    handler = logging.Handler()
    formatter = JsonFormatter("%(levelname)s %(name)s %(message)s")
    handler.emit = lambda record: records.append(formatter.format(record))  # type: ignore[method-assign]
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("sandbox.test")
    logger.addHandler(handler)
    try:
        with context.bind(request_id="req-logs-0001", channel="api"):
            logger.warning("something happened")
    finally:
        logger.removeHandler(handler)
    line = json.loads(records[0])
    assert line["request_id"] == "req-logs-0001" and line["channel"] == "api"
    assert line["message"] == "something happened"


@pytest.mark.parametrize(
    ("role", "events", "users"),
    [("admin", 200, 200), ("auditor", 200, 403), ("operator", 403, 403), ("viewer", 403, 403)],
)
def test_role_access_to_the_audit_trail_and_users(make_user, role, events, users) -> None:
    client = APIClient()
    user = make_user(role)
    if role == "admin":
        user.is_superuser = True
        user.save()
    client.force_login(user)
    assert client.get("/api/v1/events/").status_code == events
    assert client.get("/api/v1/users/").status_code == users


def test_admin_changes_a_role_and_it_is_an_event(make_user) -> None:
    admin = make_user("admin")
    target = make_user("viewer", "vera")
    client = APIClient()
    client.force_login(admin)
    response = client.post(f"/api/v1/users/{target.pk}/role/", {"role": "operator"}, format="json")
    assert response.status_code == 200 and response.json()["role"] == "operator"
    event = Event.objects.get(type="user.role_changed")
    assert event.payload == {"username": "vera", "from": "viewer", "to": "operator"}
    assert event.actor_name == admin.username
    bad = client.post(f"/api/v1/users/{target.pk}/role/", {"role": "root"}, format="json")
    assert bad.status_code == 400 and "role" in bad.json()


def test_events_can_be_filtered_and_followed(make_user) -> None:
    auditor = make_user("auditor")
    make_user("viewer")
    client = APIClient()
    client.force_login(auditor)
    page = client.get("/api/v1/events/", {"type": "user.created"}).json()
    assert page["count"] == 2
    after = page["results"][0]["position"]
    follow = client.get("/api/v1/events/", {"after": after}).json()
    assert all(e["position"] > after for e in follow["results"])
    assert client.get("/api/v1/events/", {"since": "not a date"}).status_code == 400
