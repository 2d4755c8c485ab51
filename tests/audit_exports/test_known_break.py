"""Once a break is on record, every export and every digest is refused, naming it, until a full
verification passes again or an administrator acknowledges it; reports made afterwards state the
acknowledgement (review of issue 11, F5)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection

from audit import commands, integrity
from audit.actor import Actor
from audit.digests import ChainBroken
from audit.models import Digest, Event
from tests.audit_exports.mix import SHELL, Mix

pytestmark = pytest.mark.django_db

SIGNER = Actor.system(channel="worker", name="digest-signer")


def _count(event_type: str) -> int:
    return Event.objects.filter(type=event_type).count()


def _last(event_type: str) -> Event:
    return Event.objects.filter(type=event_type).latest("position")


def _tamper(tamper, position: int, name: str) -> None:
    with tamper(), connection.cursor() as cur:
        cur.execute("UPDATE audit_event SET actor_name = %s WHERE position = %s", [name, position])


def _target() -> Event:
    target = Event.objects.filter(type="vm.started").order_by("position").first()
    assert target is not None
    return target


def _later_period() -> dict[str, str]:
    """A period after everything so far, holding a few new events."""
    time.sleep(0.01)
    since = datetime.now(UTC)
    for _ in range(3):
        commands.record_trail_read(SHELL, "test", {})
    return {"since": since.isoformat(), "until": (since + timedelta(hours=1)).isoformat()}


def _report(client, period: dict[str, str]):
    return client.post(
        "/api/v1/audit/reports/", {"framework": "soc2", "format": "json", **period}, format="json"
    )


def test_after_a_refused_export_a_later_range_is_refused_too(
    mix: Mix, token_client, tamper
) -> None:
    client = token_client(mix.auditor)
    target = _target()
    _tamper(tamper, target.position, "mallory")
    whole = {
        "since": (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
        "until": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
    }
    assert _report(client, whole).status_code == 409
    refusals = _count("audit.export_refused")
    later = _later_period()
    for url, body in (
        ("/api/v1/audit/reports/", {"framework": "soc2", "format": "json", **later}),
        ("/api/v1/audit/bundles/", later),
    ):
        response = client.post(url, body, format="json")
        assert response.status_code == 409, response.content
        assert f"position {target.position}: altered" in response.json()["detail"]
    assert _count("audit.export_refused") == refusals + 2
    assert (
        f"position {target.position}: altered" in _last("audit.export_refused").payload["problem"]
    )


def test_after_a_failed_verification_the_signer_refuses_and_says_so_once(mix: Mix, tamper) -> None:
    target = _target()
    _tamper(tamper, target.position, "mallory")
    assert not commands.verify_chain(SHELL).ok
    commands.record_trail_read(SHELL, "test", {})  # new events after every digest
    digests = Digest.objects.count()
    for _ in range(3):
        with pytest.raises(ChainBroken) as refused:
            commands.sign_digest(SIGNER, scheduled=True)
        assert refused.value.problem.position == target.position
    assert Digest.objects.count() == digests
    failures = Event.objects.filter(type="audit.digest_signing_failed")
    assert failures.count() == 1
    failure = failures.get().payload
    assert failure["reason"] == "chain_broken" and failure["position"] == target.position
    with pytest.raises(ChainBroken):
        commands.sign_digest(SHELL)  # signing by hand is refused as well


def test_a_clean_full_verification_lifts_the_refusal(mix: Mix, token_client, tamper) -> None:
    client = token_client(mix.auditor)
    target = _target()
    _tamper(tamper, target.position, "mallory")
    assert not commands.verify_chain(SHELL).ok
    assert _report(client, _later_period()).status_code == 409
    _tamper(tamper, target.position, target.actor_name)  # the damage repaired
    assert integrity.known_break() is not None
    assert commands.verify_chain(SHELL).ok
    assert integrity.known_break() is None
    assert _report(client, _later_period()).status_code in (200, 201, 202)
    assert commands.sign_digest(SIGNER, scheduled=True) is not None


def test_an_admin_acknowledges_the_break_and_every_later_report_states_it(
    mix: Mix, token_client, tamper
) -> None:
    mix.admin.is_superuser = True
    mix.admin.save()
    auditor, admin = token_client(mix.auditor), token_client(mix.admin)
    target = _target()
    _tamper(tamper, target.position, "mallory")
    assert not commands.verify_chain(SHELL).ok
    breaks = auditor.get("/api/v1/audit/breaks/").json()
    assert breaks["open"]["position"] == target.position and breaks["open"]["kind"] == "altered"
    ack = {"position": target.position, "kind": "altered", "reason": "restored from backup #42"}
    assert auditor.post("/api/v1/audit/breaks/", ack, format="json").status_code == 403
    wrong = admin.post("/api/v1/audit/breaks/", {**ack, "position": 1}, format="json")
    assert wrong.status_code == 409 and "altered" in wrong.json()["detail"]
    bad = admin.post("/api/v1/audit/breaks/", {**ack, "reason": "ok\x1b[2J"}, format="json")
    assert bad.status_code == 400
    assert _count("audit.break_acknowledged") == 0
    response = admin.post("/api/v1/audit/breaks/", ack, format="json")
    assert response.status_code == 201, response.content
    recorded = _last("audit.break_acknowledged")
    assert recorded.actor_name == mix.admin.username
    assert recorded.payload["reason"] == ack["reason"]
    assert recorded.payload["position"] == target.position
    assert auditor.get("/api/v1/audit/breaks/").json()["open"] is None

    # Past the break, exports and signing go on; each report states the acknowledged break.
    job = _report(auditor, _later_period())
    assert job.status_code in (200, 201), job.content
    body = json.loads(b"".join(auditor.get(job.json()["download_url"]).streaming_content))
    assert body["acknowledged_breaks"][0]["position"] == target.position
    assert body["acknowledged_breaks"][0]["acknowledged_by"] == mix.admin.username
    assert body["acknowledged_breaks"][0]["reason"] == ack["reason"]
    for fmt, needle in (("csv", b"THE LOG IS BROKEN"), ("pdf", b"%PDF")):
        job = auditor.post(
            "/api/v1/audit/reports/",
            {"framework": "soc2", "format": fmt, **_later_period()},
            format="json",
        ).json()
        content = b"".join(auditor.get(job["download_url"]).streaming_content)
        assert needle in content
    assert commands.sign_digest(SIGNER, scheduled=True) is not None
    # The range holding the break still cannot be vouched for, and stays refused.
    whole = {
        "since": (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
        "until": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
    }
    assert _report(auditor, whole).status_code == 409
    # That refusal names the acknowledged break: it does not stop everything again.
    assert integrity.known_break() is None
    # A different break is a new one: found in a later range, it stops everything again.
    fresh = _later_period()
    newest = Event.objects.filter(type="audit.trail_read").latest("position")
    _tamper(tamper, newest.position, "eve")
    refused = _report(auditor, fresh)
    assert refused.status_code == 409
    assert f"position {newest.position}: altered" in refused.json()["detail"]
    assert integrity.known_break().position == newest.position
    assert _report(auditor, _later_period()).status_code == 409


def test_the_dashboard_trail_says_a_break_is_on_record(mix: Mix, tamper) -> None:
    from django.test import Client

    client = Client()
    client.force_login(mix.auditor)
    assert "A break is on record" not in client.get("/audit/").content.decode()
    target = _target()
    _tamper(tamper, target.position, "mallory")
    assert not commands.verify_chain(SHELL).ok
    page = client.get("/audit/").content.decode()
    assert f"A break is on record: position {target.position} (altered)" in page
