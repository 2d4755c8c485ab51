"""Compliance reports: every figure equals what the events say, in every format."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pypdf import PdfReader

from audit import catalogue, compliance, reports
from audit.models import Event
from tests.audit_exports.mix import Mix, record_mix

pytestmark = pytest.mark.django_db

DOCS = Path(__file__).resolve().parents[2] / "docs" / "compliance.md"


def _period() -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    return now - timedelta(hours=1), now + timedelta(hours=1)


def _straight_counts(since: datetime, until: datetime) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in Event.objects.filter(recorded_at__gte=since, recorded_at__lt=until).values_list(
        "type", flat=True
    ):
        counts[t] = counts.get(t, 0) + 1
    return counts


def _payloads(event_type: str, since: datetime, until: datetime) -> list[dict]:
    return [
        json.loads(d)
        for d in Event.objects.filter(
            type=event_type, recorded_at__gte=since, recorded_at__lt=until
        ).values_list("data", flat=True)
    ]


@pytest.mark.parametrize("framework", sorted(compliance.FRAMEWORKS))
def test_every_control_count_equals_the_events_it_counts(mix: Mix, framework: str) -> None:
    since, until = _period()
    straight = _straight_counts(since, until)
    report = reports.build(framework, since, until)
    assert report.events == sum(straight.values())
    for row in report.control_rows():
        assert row["events"] == len(row["evidence"]) == sum(row["events_by_type"].values())
        for event_type, n in row["events_by_type"].items():
            assert n <= straight[event_type], (row["id"], event_type)


def test_exceptions_equal_the_events_that_raise_them(mix: Mix) -> None:
    since, until = _period()
    straight = _straight_counts(since, until)
    counts = reports.build("soc2", since, until).exception_counts()
    assert counts["failed_login"] == straight["auth.login_failed"] == 5
    assert counts["lockout"] == straight["auth.locked_out"] == 1
    assert counts["token_rejected"] == straight["auth.token_rejected"] == 1
    assert counts["token_without_expiry"] == sum(
        1 for d in _payloads("token.created", since, until) if d["expires_at"] is None
    )
    assert counts["admin_granted"] == sum(
        1 for d in _payloads("user.role_changed", since, until) if d["to"] == "admin"
    ) + sum(1 for d in _payloads("user.created", since, until) if d["role"] == "admin")
    assert counts["vm_operation_failed"] == straight["vm.start_failed"]
    assert counts["vm_crashed"] == straight["vm.crashed"]
    assert counts["snapshot_corrupted"] == straight["snapshot.corrupted"]
    assert "chain_verification_failed" not in counts  # the mix's verification passed
    assert "no_chain_verification" not in counts


def test_evidence_lists_each_event_once_with_id_actor_and_source(mix: Mix) -> None:
    since, until = _period()
    report = reports.build("iso27001", since, until)
    row = next(r for r in report.control_rows() if r["id"] == "A.8.5")
    expected = list(
        Event.objects.filter(type__startswith="auth.", recorded_at__gte=since)
        .order_by("position")
        .values_list("position", "event_id", "actor_name", "source_ip")
    )
    assert [
        (p, report.evidence[p].event_id, report.evidence[p].actor, report.evidence[p].source_ip)
        for p in row["evidence"]
    ] == [(p, str(i), a, ip) for p, i, a, ip in expected]


def test_only_events_of_the_period_count(make_user) -> None:
    record_mix(make_user)
    boundary = datetime.now(UTC)
    before = Event.objects.count()
    mix2 = record_mix(make_user)
    assert mix2
    report = reports.build("pci_dss", boundary, boundary + timedelta(hours=1))
    assert report.events == Event.objects.count() - before
    assert report.first_position == before + 1


def test_a_failed_verification_and_a_period_without_one_are_exceptions(make_user, tamper) -> None:
    from django.db import connection

    from audit.actor import Actor
    from audit.commands import verify_chain

    make_user("viewer")
    since = datetime.now(UTC) - timedelta(minutes=1)
    quiet = reports.build("hipaa", since, datetime.now(UTC) + timedelta(minutes=1))
    assert quiet.exception_counts() == {"no_chain_verification": 1}
    with tamper(), connection.cursor() as cur:
        cur.execute("UPDATE audit_event SET actor_name = 'mallory' WHERE position = 1")
    verify_chain(Actor.system())
    report = reports.build("hipaa", since, datetime.now(UTC) + timedelta(minutes=1))
    failures = [e for e in report.exceptions if e["kind"] == "chain_verification_failed"]
    assert len(failures) == 1 and "position 1: altered" in failures[0]["detail"]
    assert report.verification is not None and report.verification["ok"] is False


def test_empty_period_gives_zero_figures() -> None:
    since = datetime(2001, 1, 1, tzinfo=UTC)
    report = reports.build("gdpr", since, since + timedelta(days=1))
    assert report.events == 0
    assert all(r["events"] == 0 and r["status"] == "no evidence" for r in report.control_rows())


def test_json_csv_and_pdf_carry_the_same_figures(mix: Mix) -> None:
    since, until = _period()
    report = reports.build("soc2", since, until, generated_by="auditor")
    buf = io.BytesIO()
    reports.write_json(report, buf)
    doc = json.loads(buf.getvalue())
    assert [c["events"] for c in doc["controls"]] == [c["events"] for c in report.control_rows()]
    assert len(doc["exceptions"]) == len(report.exceptions)

    buf = io.BytesIO()
    reports.write_csv(report, buf)
    rows = list(csv.DictReader(io.StringIO(buf.getvalue().decode())))
    controls = {r["control"]: int(r["count"]) for r in rows if r["record"] == "control"}
    assert controls == {c["id"]: c["events"] for c in report.control_rows()}
    assert sum(1 for r in rows if r["record"] == "exception") == len(report.exceptions)
    evidence = [r for r in rows if r["record"] == "evidence"]
    assert len(evidence) == sum(len(c.positions) for c in report.controls.values())

    buf = io.BytesIO()
    reports.write_pdf(report, buf)
    data = buf.getvalue()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    pdf = PdfReader(io.BytesIO(data))
    text = "\n".join(page.extract_text() for page in pdf.pages)
    assert len(pdf.pages) >= 2
    assert "SOC 2" in (pdf.metadata.title or "")
    for control in report.control_rows():
        assert control["id"] in text
    assert f"Events in period: {report.events}" in text


def test_csv_cells_cannot_become_spreadsheet_formulas(make_user) -> None:
    from accounts import commands
    from audit.actor import Actor

    user = make_user("operator")
    commands.create_token(Actor.system(), user, name="=HYPERLINK(1)", expires_days=None)
    since, until = _period()
    buf = io.BytesIO()
    reports.write_csv(reports.build("soc2", since, until), buf)
    assert ",=HYPERLINK" not in buf.getvalue().decode()


def test_compact_ranges() -> None:
    assert reports.compact_ranges([1, 2, 3, 5, 7, 8]) == "1-3, 5, 7-8"
    assert reports.compact_ranges([]) == ""


def test_every_evidence_type_of_the_catalogue_is_counted_by_a_control() -> None:
    unmapped = [
        t.name
        for t in catalogue.all_types()
        if t.category in {"access", "change", "data", "monitoring"}
        and t.name not in compliance.counted_types()
        and t.name not in compliance.NOT_EVIDENCE
    ]
    assert unmapped == [], "count these event types in a control in audit/compliance.py"


def test_every_control_is_documented() -> None:
    text = DOCS.read_text()
    for framework in compliance.FRAMEWORKS.values():
        for control in framework.controls:
            assert f"| {control.id} |" in text, f"{framework.key} {control.id} not in compliance.md"
            assert control.asks in text and control.manual in text, control.id
    for rule in (*compliance.EXCEPTION_RULES, compliance.NO_VERIFICATION):
        assert f"`{rule.kind}`" in text


def _pdf_text(report: reports.Report) -> str:
    buf = io.BytesIO()
    reports.write_pdf(report, buf)
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(buf.getvalue())).pages)


def test_every_format_carries_the_source_address_and_event_id_of_exceptions(mix: Mix) -> None:
    from tests.audit_exports.mix import GUESSER_IP

    since, until = _period()
    report = reports.build("pci_dss", since, until)
    failures = [e for e in report.exceptions if e["kind"] == "failed_login"]
    assert failures and all(e["source_ip"] == GUESSER_IP for e in failures)

    buf = io.BytesIO()
    reports.write_csv(report, buf)
    rows = list(csv.DictReader(io.StringIO(buf.getvalue().decode())))
    csv_failures = [r for r in rows if r["record"] == "exception" and r["kind"] == "failed_login"]
    assert [(r["event_id"], r["source_ip"]) for r in csv_failures] == [
        (e["event_id"], GUESSER_IP) for e in failures
    ]
    evidence = [
        r for r in rows if r["record"] == "evidence" and r["event_type"] == "auth.login_failed"
    ]
    assert evidence and all(r["source_ip"] == GUESSER_IP for r in evidence)

    text = _pdf_text(report)
    for e in failures:
        assert e["event_id"] in text
    assert GUESSER_IP in text


def test_pdf_words_are_never_split_across_lines(make_user) -> None:
    from accounts import commands
    from audit.actor import Actor

    since = datetime.now(UTC)
    admin = make_user("admin", username="bootstrap_admin")
    as_admin = Actor.for_user(admin, channel="api", token_id="")
    user = commands.create_user(
        as_admin, username="service_account_for_nightly_backups", password=None, role="viewer"
    )
    commands.set_role(as_admin, user, "operator")
    commands.create_token(as_admin, user, name="nightly_backup_pipeline", expires_days=None)
    report = reports.build("soc2", since, datetime.now(UTC) + timedelta(minutes=1))
    text = _pdf_text(report)
    words = {"bootstrap_admin", "service_account_for_nightly_backups", "user.role_changed"}
    words |= {report.evidence[p].event_id for p in report.evidence}
    for word in words:
        assert word in text, f"{word} is split or missing in the PDF"


def test_the_access_review_states_users_roles_tokens_and_changes_at_period_end(mix: Mix) -> None:
    since, until = _period()
    review = reports.build("soc2", since, until).as_dict()["access_review"]
    users = {u["username"]: u for u in review["users"]}
    assert users[mix.operator.username]["role"] == "operator"
    temp = next(u for name, u in users.items() if name.startswith("temp0-"))
    assert temp["role"] == "operator" and temp["active"] is False
    tokens = {t["name"]: t for t in review["tokens"]}
    assert tokens["ci-0"]["active"] is True and tokens["ci-0"]["expires_at"]
    assert tokens["forever-0"]["active"] is False and tokens["forever-0"]["revoked_at"]
    assert tokens["forever-0"]["revoked_by"] == mix.operator.username
    roles = {r["role"]: r for r in review["roles"]}
    assert mix.auditor.username in roles["auditor"]["members"]
    assert "audit.view_audit_trail" in roles["auditor"]["permissions"]
    grants = [c for c in review["changes"] if c["type"] == "user.role_changed"]
    assert [c["detail"].split(": ", 1)[1] for c in grants] == [
        "role viewer -> admin",
        "role admin -> operator",
    ]
    assert all(c["by"] == mix.admin.username and c["event_id"] for c in grants)


def test_the_access_review_is_as_of_the_period_end(mix: Mix) -> None:
    from accounts import commands
    from audit.actor import Actor

    cut = datetime.now(UTC)
    commands.set_role(Actor.system(), mix.viewer, "admin")
    before = reports.build("soc2", cut - timedelta(hours=1), cut).access
    after = reports.build("soc2", cut, datetime.now(UTC) + timedelta(minutes=1)).access
    assert before is not None and after is not None
    assert before.users[str(mix.viewer.pk)].role == "viewer"
    assert after.users[str(mix.viewer.pk)].role == "admin"
    assert [c["type"] for c in after.changes] == ["user.role_changed"]


def test_a_pdf_with_absurdly_long_user_words_is_still_produced(make_user) -> None:
    from accounts import commands
    from audit.actor import Actor

    since = datetime.now(UTC)
    wide = "W" * 150
    user = commands.create_user(Actor.system(), username=wide, password=None, role="viewer")
    for _ in range(3):
        commands.create_token(Actor.system(), user, name=("M" * 100), expires_days=None)
    report = reports.build("soc2", since, datetime.now(UTC) + timedelta(minutes=1))
    text = _pdf_text(report)
    assert "W" * 45 + "..." in text  # shortened, said so, and the JSON and CSV keep it whole
