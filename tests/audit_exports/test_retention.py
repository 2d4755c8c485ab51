"""Retention that holds (issue 11, item 7): seven calendar years, legal holds, archives that
carry console recordings and earlier exports, export files kept write-once, no pruning."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.conf import settings as django_settings

from audit import reports, retention, store
from audit.actor import Actor
from audit.models import Event
from audit.offline import verify_bundle
from tests.audit_exports.mix import Mix

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]


def _period() -> dict[str, str]:
    now = datetime.now(UTC)
    return {
        "since": (now - timedelta(hours=1)).isoformat(),
        "until": (now + timedelta(hours=1)).isoformat(),
    }


def test_retention_is_seven_calendar_years_by_default() -> None:
    assert django_settings.SANDBOX_AUDIT_RETENTION_YEARS == 7
    assert not hasattr(django_settings, "SANDBOX_AUDIT_RETENTION_DAYS")
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    # 2,555 days (7 x 365) would end on 2019-03-03: two days short of seven years.
    assert retention.cutoff(now) == datetime(2019, 3, 1, 12, tzinfo=UTC)
    leap = datetime(2028, 2, 29, tzinfo=UTC)
    assert retention.cutoff(leap) == datetime(2021, 2, 28, tzinfo=UTC)


def test_the_old_days_setting_is_refused_rather_than_ignored() -> None:
    env = dict(os.environ, SANDBOX_AUDIT_RETENTION_DAYS="2555")
    result = subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-c", "import sandbox_site.settings"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "SANDBOX_AUDIT_RETENTION_YEARS" in result.stderr


def test_nothing_pretends_to_prune() -> None:
    assert [n for n in dir(django_settings) if "PRUNE" in n or "PURGE" in n] == []
    assert retention.status()["pruning"].startswith("not implemented")


def test_reports_state_the_retention_in_years_and_the_active_holds(mix: Mix) -> None:
    from audit import commands

    hold = commands.place_legal_hold(Actor.for_user(mix.auditor), "litigation 2026-17")
    since, until = _period()["since"], _period()["until"]
    report = reports.build("soc2", datetime.fromisoformat(since), datetime.fromisoformat(until))
    r = report.as_dict()["retention"]
    assert r["years"] == 7 and "days" not in r
    assert [h["hold_id"] for h in r["legal_holds"]] == [hold]
    buf = io.BytesIO()
    reports.write_csv(report, buf)
    assert "7 calendar years" in buf.getvalue().decode()


def test_legal_holds_are_placed_and_released_as_events(mix: Mix, token_client) -> None:
    client = token_client(mix.auditor)
    response = client.post("/api/v1/audit/legal-holds/", {"reason": ""}, format="json")
    assert response.status_code == 400 and "reason" in response.json()
    assert not Event.objects.filter(type="audit.legal_hold_placed").exists()
    response = client.post(
        "/api/v1/audit/legal-holds/", {"reason": "regulator inquiry"}, format="json"
    )
    assert response.status_code == 201, response.content
    hold = response.json()["hold_id"]
    placed = Event.objects.get(type="audit.legal_hold_placed")
    assert placed.payload["hold_id"] == hold and placed.actor_name == mix.auditor.username
    status = client.get("/api/v1/audit/retention/").json()
    assert [(h["hold_id"], h["active"]) for h in status["legal_holds"]] == [(hold, True)]
    assert status["years"] == 7
    released = client.post(f"/api/v1/audit/legal-holds/{hold}/release/", {"reason": "closed"})
    assert released.status_code == 200
    again = client.post(f"/api/v1/audit/legal-holds/{hold}/release/", {})
    assert again.status_code == 404
    assert Event.objects.filter(type="audit.legal_hold_released").count() == 1
    status = client.get("/api/v1/audit/retention/").json()
    assert status["legal_holds"][0]["active"] is False
    assert status["legal_holds"][0]["released_by"] == mix.auditor.username


def test_viewers_cannot_place_holds(make_user, token_client) -> None:
    client = token_client(make_user("viewer"))
    response = client.post("/api/v1/audit/legal-holds/", {"reason": "x"}, format="json")
    assert response.status_code == 403
    assert not Event.objects.filter(type="audit.legal_hold_placed").exists()


def _recording(console_dir: Path, name: str, content: bytes, mix: Mix) -> Event:
    console_dir.mkdir(parents=True, exist_ok=True)
    (console_dir / name).write_bytes(content)
    store.append(
        "vm",
        mix.vm_ids[0],
        "vm.console_closed",
        {
            "session": "s9",
            "recording": name,
            "format": "asciicast-v2",
            "size": len(content),
            "sha256": hashlib.sha256(content).hexdigest(),
        },
        actor=Actor.for_user(mix.operator, channel="dashboard"),
    )
    return Event.objects.filter(type="vm.console_closed").latest("position")


def test_an_archive_carries_console_recordings_and_earlier_report_files(
    mix: Mix, token_client, settings, tmp_path: Path
) -> None:
    settings.SANDBOX_CONSOLE_DIR = tmp_path / "console"
    cast = b'{"version": 2, "width": 80, "height": 24}\n[0.1, "o", "hello"]\n'
    closed = _recording(settings.SANDBOX_CONSOLE_DIR, "s9.cast", cast, mix)
    client = token_client(mix.auditor)
    report = client.post(
        "/api/v1/audit/reports/", {"framework": "gdpr", "format": "json", **_period()}
    ).json()
    exported = Event.objects.filter(type="audit.exported").latest("position")
    before = datetime.now(UTC).isoformat()
    archive = client.post("/api/v1/audit/archives/", {"before": before}, format="json")
    assert archive.status_code == 201, archive.content
    path = tmp_path / "archive.zip"
    path.write_bytes(b"".join(client.get(archive.json()["download_url"]).streaming_content))
    assert verify_bundle(str(path)).ok
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        entries = {a["position"]: a for a in manifest["attachments"]}
        rec = entries[closed.position]
        assert rec["note"] is None and zf.read(rec["file"]) == cast
        assert manifest["files"][rec["file"]]["sha256"] == hashlib.sha256(cast).hexdigest()
        rep = entries[exported.position]
        assert rep["note"] is None and rep["sha256"] == report["sha256"]
        assert hashlib.sha256(zf.read(rep["file"])).hexdigest() == report["sha256"]
    assert manifest["retention"]["years"] == 7


def test_an_altered_recording_is_named_in_the_archive(
    mix: Mix, token_client, settings, tmp_path: Path
) -> None:
    settings.SANDBOX_CONSOLE_DIR = tmp_path / "console"
    closed = _recording(settings.SANDBOX_CONSOLE_DIR, "s9.cast", b"original\n", mix)
    (settings.SANDBOX_CONSOLE_DIR / "s9.cast").write_bytes(b"rewritten\n")
    client = token_client(mix.auditor)
    before = datetime.now(UTC).isoformat()
    archive = client.post("/api/v1/audit/archives/", {"before": before}, format="json").json()
    data = b"".join(client.get(archive["download_url"]).streaming_content)
    manifest = json.loads(zipfile.ZipFile(io.BytesIO(data)).read("manifest.json"))
    entry = next(a for a in manifest["attachments"] if a["position"] == closed.position)
    assert "does NOT match its event" in entry["note"]


def test_export_files_are_kept_read_only(mix: Mix, token_client) -> None:
    from audit.exports import export_path
    from audit.models import ExportJob

    client = token_client(mix.auditor)
    job = client.post(
        "/api/v1/audit/reports/", {"framework": "soc2", "format": "pdf", **_period()}
    ).json()
    path = export_path(ExportJob.objects.get(pk=job["id"]))
    assert path.stat().st_mode & 0o777 == 0o444


def test_the_retention_page_places_and_releases_holds(mix: Mix) -> None:
    from django.test import Client

    client = Client()
    client.force_login(mix.auditor)
    page = client.get("/audit/retention/")
    assert page.status_code == 200 and "7 calendar years" in page.content.decode()
    assert "not implemented" in page.content.decode()
    client.post("/audit/retention/", {"action": "place", "reason": "audit 2026"})
    hold = Event.objects.get(type="audit.legal_hold_placed").payload["hold_id"]
    assert hold in client.get("/audit/retention/").content.decode()
    client.post("/audit/retention/", {"action": "release", "hold_id": hold})
    assert Event.objects.filter(type="audit.legal_hold_released").count() == 1
    viewer = Client()
    viewer.force_login(mix.viewer)
    assert viewer.get("/audit/retention/").status_code == 403
    assert viewer.post("/audit/retention/", {"action": "place", "reason": "x"}).status_code == 403
    assert Event.objects.filter(type="audit.legal_hold_placed").count() == 1
