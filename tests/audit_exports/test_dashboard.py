"""The auditor area of the dashboard: who sees it, filters, event detail, exports."""

from __future__ import annotations

import pytest
from django.test import Client

from audit.models import Event, ExportJob
from tests.audit_exports.mix import Mix

pytestmark = pytest.mark.django_db


def _login(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.parametrize("role", ["viewer", "operator"])
def test_the_auditor_area_is_closed_to_others(make_user, role: str) -> None:
    client = _login(make_user(role))
    for url in (
        "/audit/",
        "/audit/digests/",
        "/audit/exports/",
        "/audit/sessions/",
        "/audit/events/1/",
    ):
        assert client.get(url).status_code == 403, url
    assert client.post("/audit/verify/").status_code == 403


def test_anonymous_users_are_sent_to_login() -> None:
    response = Client().get("/audit/")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_the_trail_filters_by_actor_type_subject_time_and_text(mix: Mix) -> None:
    client = _login(mix.auditor)
    page = client.get("/audit/")
    # The page lists every event before it; its own read is recorded after it (audit.trail_read).
    assert page.status_code == 200
    assert page.context["page"].paginator.count == Event.objects.count() - 1
    assert Event.objects.latest("position").type == "audit.trail_read"
    by_type = client.get("/audit/", {"type": "auth.login_failed"}).context["page"]
    assert by_type.paginator.count == 5
    vm = mix.vm_ids[0]
    by_vm = client.get("/audit/", {"aggregate_type": "vm", "aggregate_id": vm}).context["page"]
    assert by_vm.paginator.count == Event.objects.filter(aggregate_id=vm).count()
    by_actor = client.get("/audit/", {"actor": mix.operator.username}).context["page"]
    assert (
        by_actor.paginator.count == Event.objects.filter(actor_name=mix.operator.username).count()
    )
    by_text = client.get("/audit/", {"q": "kernel not found"}).context["page"]
    assert [e.type for e in by_text] == ["vm.start_failed"]
    future = client.get("/audit/", {"since": "2999-01-01 00:00"}).context["page"]
    assert future.paginator.count == 0
    bad = client.get("/audit/", {"since": "not a date"})
    assert bad.status_code == 200 and "since" in bad.context["form"].errors


def test_event_detail_shows_hashes_and_the_last_verification(mix: Mix) -> None:
    client = _login(mix.auditor)
    page = client.get("/audit/events/3/")
    assert page.status_code == 200
    event = Event.objects.get(position=3)
    html = page.content.decode()
    assert event.hash in html and event.prev_hash in html
    assert page.context["hash_ok"] and page.context["link_ok"] and page.context["covered"]
    assert "recomputes from its content" in html
    assert client.get("/audit/events/99999/").status_code == 404


def test_event_detail_flags_an_altered_event(mix: Mix, tamper) -> None:
    from django.db import connection

    with tamper(), connection.cursor() as cur:
        cur.execute("UPDATE audit_event SET actor_name = 'mallory' WHERE position = 4")
    page = _login(mix.auditor).get("/audit/events/4/")
    assert not page.context["hash_ok"] and "altered" in page.content.decode()


def test_verification_runs_on_demand_and_is_shown(mix: Mix) -> None:
    client = _login(mix.auditor)
    before = Event.objects.filter(type="audit.chain_verified").count()
    response = client.post("/audit/verify/", {"next": "/audit/events/2/"}, follow=True)
    assert response.redirect_chain[-1][0] == "/audit/events/2/"
    assert "Chain intact" in response.content.decode()
    assert Event.objects.filter(type="audit.chain_verified").count() == before + 1
    evil = client.post("/audit/verify/", {"next": "https://evil.example/"})
    assert evil["Location"] == "/audit/"


def test_digests_page_lists_digests_and_key_fingerprints(mix: Mix) -> None:
    client = _login(mix.auditor)
    page = client.get("/audit/digests/")
    assert page.status_code == 200
    fingerprint = page.context["keys"][0].fingerprint
    assert fingerprint in page.content.decode()
    assert client.post("/audit/digests/sign/").status_code == 302
    assert client.get("/audit/keys.json").json()["keys"][0]["fingerprint"] == fingerprint


def test_a_report_is_produced_from_the_dashboard_with_progress(mix: Mix) -> None:
    client = _login(mix.auditor)
    page = client.get("/audit/exports/")
    assert page.status_code == 200 and page.context["can_export"]
    response = client.post(
        "/audit/exports/",
        {
            "kind": "report",
            "framework": "hipaa",
            "format": "json",
            "since": "2020-01-01",
            "until": "2999-01-01",
        },
    )
    job = ExportJob.objects.get()
    assert response["Location"] == f"/audit/exports/{job.pk}/"
    detail = client.get(response["Location"])
    assert detail.status_code == 200 and "status.json" in detail.content.decode()
    state = client.get(f"/audit/exports/{job.pk}/status.json").json()
    assert state["status"] == "done" and state["percent"] == 100
    download = client.get(state["download_url"])
    assert download.status_code == 200
    assert b'"framework"' in b"".join(download.streaming_content)


def test_a_bad_export_form_shows_field_errors(mix: Mix) -> None:
    client = _login(mix.auditor)
    page = client.post(
        "/audit/exports/", {"kind": "bundle", "since": "2026-02-01", "until": "2026-01-01"}
    )
    assert page.status_code == 200
    assert "must be after since" in page.content.decode()
    assert not ExportJob.objects.exists()


def test_console_sessions_are_listed_for_auditors(mix: Mix) -> None:
    # Replay itself is tested in tests/dashboard/test_pages.py with a real recording.
    page = _login(mix.auditor).get("/audit/sessions/")
    assert page.status_code == 200
    assert page.context["page"].paginator.count == 2
