"""Reading the trail is recorded once per request, with only validated filters in the event
(review of issue 11: F3 a NUL in the query string, F4 reads that left no event)."""

from __future__ import annotations

import pytest
from django.test import Client

from audit.models import Event
from tests.audit_exports.mix import Mix

pytestmark = pytest.mark.django_db


def _reads() -> int:
    return Event.objects.filter(type="audit.trail_read").count()


def _last_read() -> Event:
    return Event.objects.filter(type="audit.trail_read").latest("position")


def _login(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.parametrize("param", ["x", "actor_id", "channel", "token_id", "event_id", "page"])
def test_unknown_query_parameters_are_not_recorded_even_with_a_nul(
    mix: Mix, token_client, param: str
) -> None:
    client = token_client(mix.auditor)
    before = _reads()
    response = client.get(f"/api/v1/events/?{param}=%00&type=vm.started")
    assert response.status_code == 200, response.content
    assert _reads() == before + 1
    read = _last_read()
    assert read.payload["filters"] == {"type": "vm.started"}
    assert "\x00" not in read.data


@pytest.mark.parametrize(
    "param", ["type", "type_prefix", "aggregate_type", "aggregate_id", "actor", "correlation_id"]
)
@pytest.mark.parametrize("value", ["%00", "a%0Ab", "%1B%5B31m"])
def test_a_filter_with_control_characters_is_a_json_400_and_no_read(
    mix: Mix, token_client, param: str, value: str
) -> None:
    client = token_client(mix.auditor)
    before = _reads()
    response = client.get(f"/api/v1/events/?{param}={value}")
    assert response.status_code == 400, response.content
    assert param in response.json()
    assert _reads() == before


def test_api_read_records_the_validated_filters_and_page(mix: Mix, token_client) -> None:
    client = token_client(mix.auditor)
    response = client.get("/api/v1/events/", {"actor": mix.operator.username, "limit": "3"})
    assert response.status_code == 200
    assert _last_read().payload["filters"] == {"actor": mix.operator.username, "limit": "3"}


@pytest.mark.parametrize(
    "query", ["x=%00", "type=%00", "actor=%00", "q=%00", "aggregate_id=%00", "actor=a%1Bb"]
)
def test_the_dashboard_trail_answers_a_nul_with_a_form_error_and_records_no_text(
    mix: Mix, query: str
) -> None:
    client = _login(mix.auditor)
    before = _reads()
    response = client.get(f"/audit/?{query}")
    assert response.status_code == 200
    assert _reads() == before + 1
    read = _last_read()
    assert "\x00" not in read.data and "\x1b" not in read.data
    name = query.split("=")[0]
    if name == "x":
        assert read.payload["filters"] == {"page": "1"}
    else:
        assert read.payload["invalid"] == [name] and read.payload["returned"] == 0
        assert response.context["form"].errors[name]


def test_the_dashboard_sessions_page_ignores_unknown_parameters(mix: Mix) -> None:
    response = _login(mix.auditor).get("/audit/sessions/?x=%00&page=%00")
    assert response.status_code == 200
    assert _last_read().payload["filters"] == {"page": "1"}


@pytest.mark.parametrize("reason", ["a\x00b", "a\x1b[2Jb", "x" * 501])
def test_legal_hold_reasons_with_control_characters_are_refused(
    mix: Mix, token_client, reason: str
) -> None:
    client = token_client(mix.auditor)
    dashboard = _login(mix.auditor)
    before = Event.objects.count()
    response = client.post("/api/v1/audit/legal-holds/", {"reason": reason}, format="json")
    assert response.status_code == 400 and "reason" in response.json()
    response = client.post(
        "/api/v1/audit/legal-holds/abc/release/", {"reason": reason}, format="json"
    )
    assert response.status_code == 400 and "reason" in response.json()
    page = dashboard.post("/audit/retention/", {"action": "place", "reason": reason}, follow=True)
    assert page.status_code == 200
    assert Event.objects.count() == before
