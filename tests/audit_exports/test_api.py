"""The auditor API: who may read and export, validation, inline and queued exports."""

from __future__ import annotations

import hashlib
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pypdf import PdfReader

from audit import tasks
from audit.models import Event, ExportJob
from audit.offline import verify_bundle
from tests.audit_exports.mix import Mix

pytestmark = pytest.mark.django_db


def _period() -> dict[str, str]:
    now = datetime.now(UTC)
    return {
        "since": (now - timedelta(hours=1)).isoformat(),
        "until": (now + timedelta(hours=1)).isoformat(),
    }


def _download(client, job: dict) -> bytes:
    response = client.get(job["download_url"])
    assert response.status_code == 200, response.content
    return b"".join(response.streaming_content)


def test_auditor_reads_the_trail_digests_keys_and_frameworks(mix: Mix, token_client) -> None:
    client = token_client(mix.auditor)
    assert client.get("/api/v1/events/").status_code == 200
    digests = client.get("/api/v1/audit/digests/")
    assert digests.status_code == 200 and digests.json()["count"] >= 1
    keys = client.get("/api/v1/audit/keys/").json()["keys"]
    assert keys[0]["key_id"] == "ed25519-1" and len(keys[0]["fingerprint"]) == 64
    assert "BEGIN PUBLIC KEY" in keys[0]["public_key_pem"]
    frameworks = client.get("/api/v1/audit/frameworks/").json()
    assert {f["key"] for f in frameworks["frameworks"]} == {
        "soc2",
        "iso27001",
        "hipaa",
        "pci_dss",
        "gdpr",
    }


def test_auditor_exports_a_pdf_report_which_is_recorded(mix: Mix, token_client) -> None:
    client = token_client(mix.auditor)
    response = client.post(
        "/api/v1/audit/reports/", {"framework": "soc2", "format": "pdf", **_period()}, format="json"
    )
    assert response.status_code == 201, response.content
    job = response.json()
    assert job["status"] == "done" and job["percent"] == 100
    content = _download(client, job)
    pdf = PdfReader(io.BytesIO(content))
    assert "CC8.1" in "\n".join(p.extract_text() for p in pdf.pages)
    exported = Event.objects.filter(type="audit.exported").latest("position")
    assert exported.actor_name == mix.auditor.username
    assert exported.payload["sha256"] == hashlib.sha256(content).hexdigest() == job["sha256"]
    assert exported.payload["kind"] == "report" and exported.payload["framework"] == "soc2"


def test_auditor_exports_a_bundle_that_verifies(mix: Mix, token_client, tmp_path: Path) -> None:
    client = token_client(mix.auditor)
    response = client.post("/api/v1/audit/bundles/", _period(), format="json")
    assert response.status_code == 201, response.content
    path = tmp_path / "b.zip"
    path.write_bytes(_download(client, response.json()))
    result = verify_bundle(str(path))
    assert result.ok, result.problems


def test_an_archive_bundles_the_events_before_a_date(mix: Mix, token_client, tmp_path) -> None:
    client = token_client(mix.auditor)
    before = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    assert client.post("/api/v1/audit/archives/", {"before": before}).status_code == 400  # future
    before = datetime.now(UTC).isoformat()
    response = client.post("/api/v1/audit/archives/", {"before": before}, format="json")
    assert response.status_code == 201, response.content
    path = tmp_path / "a.zip"
    path.write_bytes(_download(client, response.json()))
    assert verify_bundle(str(path)).ok
    import zipfile

    manifest = json.loads(zipfile.ZipFile(path).read("manifest.json"))
    assert manifest["kind"] == "archive"
    assert manifest["requested"]["entirely_beyond_retention"] is False
    assert manifest["retention"]["years"] == 7 and "retention_days" not in manifest


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"framework": "sox", "since": "2026-01-01", "until": "2026-02-01"}, "framework"),
        (
            {"framework": "soc2", "format": "docx", "since": "2026-01-01", "until": "2026-02-01"},
            "format",
        ),
        ({"framework": "soc2", "since": "yesterday", "until": "2026-02-01"}, "since"),
        ({"framework": "soc2", "since": "2026-02-01", "until": "2026-01-01"}, "until"),
        ({"framework": "soc2", "until": "2026-01-01"}, "since"),
        ({"framework": "soc2", "since": "2999-01-01", "until": "2999-02-01"}, "since"),
    ],
)
def test_a_bad_report_request_is_400_with_field_errors(
    make_user, token_client, body: dict, field: str
) -> None:
    client = token_client(make_user("auditor"))
    response = client.post("/api/v1/audit/reports/", body, format="json")
    assert response.status_code == 400
    assert field in response.json(), response.json()
    assert not ExportJob.objects.exists()


def test_a_bundle_of_an_empty_period_is_400(make_user, token_client) -> None:
    client = token_client(make_user("auditor"))
    response = client.post(
        "/api/v1/audit/bundles/", {"since": "2001-01-01", "until": "2001-02-01"}, format="json"
    )
    assert response.status_code == 400 and "since" in response.json()


def test_a_large_export_is_queued_and_reports_progress(
    mix: Mix, token_client, settings, django_capture_on_commit_callbacks
) -> None:
    settings.SANDBOX_AUDIT_INLINE_EXPORT_MAX = 5
    client = token_client(mix.auditor)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = client.post(
            "/api/v1/audit/reports/", {"framework": "gdpr", "format": "csv", **_period()}
        )
    assert response.status_code == 202, response.content
    job = response.json()
    assert job["status"] == "queued" and job["download_url"] is None and job["total"] > 5
    assert len(callbacks) == 1  # the worker task, enqueued on commit
    assert client.get(job["url"]).json()["status"] == "queued"
    assert tasks.run_export(job["id"]) == "done"
    assert tasks.run_export(job["id"]) == "done"  # a redelivered task does nothing
    state = client.get(job["url"]).json()
    assert state["status"] == "done" and state["processed"] == state["total"]
    assert Event.objects.filter(type="audit.exported").count() == 1
    content = _download(client, state).decode()
    assert content.startswith("record,control,kind")


@pytest.mark.parametrize("role", ["viewer", "operator"])
def test_viewers_and_operators_cannot_use_the_auditor_api(make_user, token_client, role) -> None:
    client = token_client(make_user(role))
    assert (
        client.post("/api/v1/audit/reports/", {"framework": "soc2", **_period()}).status_code == 403
    )
    assert client.post("/api/v1/audit/bundles/", _period()).status_code == 403
    assert client.post("/api/v1/audit/archives/", {"before": "2020-01-01"}).status_code == 403
    assert client.get("/api/v1/audit/exports/").status_code == 403
    assert client.get("/api/v1/audit/digests/").status_code == 403
    assert client.post("/api/v1/audit/digests/").status_code == 403
    assert client.get("/api/v1/audit/keys/").status_code == 403
    assert client.get("/api/v1/events/").status_code == 403
    assert not ExportJob.objects.exists()


def test_auditor_cannot_administer_users_roles_or_tokens(mix: Mix, token_client) -> None:
    from accounts.models import APIToken

    client = token_client(mix.auditor)
    assert client.get("/api/v1/users/").status_code == 403
    assert (
        client.post(
            "/api/v1/users/", {"username": "x", "role": "admin", "password": "long-enough-1"}
        ).status_code
        == 403
    )
    assert (
        client.post(f"/api/v1/users/{mix.auditor.pk}/role/", {"role": "admin"}).status_code == 403
    )
    assert (
        client.post(f"/api/v1/users/{mix.operator.pk}/role/", {"role": "viewer"}).status_code == 403
    )
    # Other users' tokens are outside an auditor's token list: they can be neither seen nor revoked.
    other = APIToken.objects.filter(user=mix.operator).first()
    assert client.delete(f"/api/v1/tokens/{other.pk}/").status_code == 404
    assert {t["username"] for t in client.get("/api/v1/tokens/").json()["results"]} == {
        mix.auditor.username
    }
    assert mix.auditor.role == "auditor"


def test_auditor_holds_no_vm_drive_permission(mix: Mix) -> None:
    from accounts.roles import VM_DRIVE

    assert not any(mix.auditor.has_perm(p) for p in VM_DRIVE)
    assert all(
        mix.auditor.has_perm(p)
        for p in ("audit.view_audit_trail", "audit.export_audit", "audit.verify_audit")
    )


def test_a_read_only_token_may_read_but_not_export(mix: Mix, token_client) -> None:
    client = token_client(mix.auditor, read_only=True)
    assert client.get("/api/v1/audit/keys/").status_code == 200
    assert client.post("/api/v1/audit/bundles/", _period()).status_code == 403


def test_auditor_signs_a_digest_on_demand(mix: Mix, token_client) -> None:
    client = token_client(mix.auditor)
    response = client.post("/api/v1/audit/digests/")
    assert response.status_code == 201
    assert response.json()["algorithm"] == "ed25519"
    signed = Event.objects.filter(type="audit.digest_signed").latest("position")
    assert signed.actor_name == mix.auditor.username


def test_download_of_an_unfinished_export_is_a_conflict(mix: Mix, token_client, settings) -> None:
    settings.SANDBOX_AUDIT_INLINE_EXPORT_MAX = 0
    client = token_client(mix.auditor)
    job = client.post("/api/v1/audit/bundles/", _period()).json()
    response = client.get(f"/api/v1/audit/exports/{job['id']}/download/")
    assert response.status_code == 409 and response.json()["status"] == "queued"
