"""Each control lists exactly the evidence its definition asks for, and says "no evidence" when
the period holds none of it (one test per framework, written from the control texts, not from
``audit.compliance``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from accounts import commands as accounts
from audit import reports, store
from audit.actor import Actor
from audit.commands import verify_chain
from audit.models import Event
from tests.audit_exports.mix import Mix

pytestmark = pytest.mark.django_db

FAILED = {"auth.login_failed", "auth.unknown_user_failed"}
LOCKED = {"auth.locked_out", "auth.login_throttled"}
AUTH = (
    {"auth.logged_in", "auth.logged_out", "auth.unlocked", "auth.token_rejected"} | FAILED | LOCKED
)
LOGIN_SIGNALS = FAILED | LOCKED | {"auth.token_rejected"}
REFUSALS = {"audit.export_refused", "audit.digest_signing_failed", "audit.break_acknowledged"}
ACCOUNTS = {"user.created", "user.deactivated", "user.reactivated", "user.password_changed"}
TOKENS = {"token.created", "token.revoked"}
TRANSFERS = {"vm.file_upload_requested", "vm.file_uploaded", "vm.file_upload_failed"}
TRANSFERS |= {"vm.file_download_requested", "vm.file_downloaded", "vm.file_download_failed"}
COMMANDS = {"vm.exec_requested", "vm.exec_completed", "vm.exec_failed"}
EXPORTS = {"audit.exported", "audit.export_downloaded"}
READS = {"audit.trail_read", "audit.accounts_listed"}
HOLDS = {"audit.legal_hold_placed", "audit.legal_hold_released"}
# Types nothing in the product appends: counted by no control (the mix still holds some).
NOT_EMITTED = {"vm.create_requested", "snapshot.verified", "vm.recovered"}
# What a VM's egress policy refused and its DNS lookups: monitoring, not changes.
NET_EVIDENCE = {"net.egress_refused", "net.dns_lookups"}
BACKUPS = {"snapshot.created", "snapshot.corrupted", "snapshot.deleted"}
BACKUPS |= {"vm.snapshotted", "vm.snapshot_failed", "vm.restored", "vm.restore_failed"}
SNAPSHOT_CHECKS = {"snapshot.corrupted"}


NOT_CHANGES = {"vm.progress", "vm.crashed"} | COMMANDS | NOT_EMITTED | NET_EVIDENCE
NOT_CHANGES |= TRANSFERS | {"vm.console_opened", "vm.console_closed"}


def _change(t: str) -> bool:
    """VM lifecycle requests and outcomes and network changes, that the product appends."""
    return t not in NOT_CHANGES and t.startswith(("net.", "vm."))


def _types(types: set[str]) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["type"] in types


def _failed_verification(e: dict[str, Any]) -> bool:
    return e["type"] == "audit.chain_verified" and json.loads(e["data"])["ok"] is False


def _admin(e: dict[str, Any]) -> bool:
    d = json.loads(e["data"])
    if e["type"] == "user.role_changed":
        return "admin" in (d["from"], d["to"])
    return e["type"] == "user.created" and (d["role"] == "admin" or d.get("superuser"))


def _any(*tests: Callable[[dict[str, Any]], bool]) -> Callable[[dict[str, Any]], bool]:
    return lambda e: any(t(e) for t in tests)


MONITORING = _any(
    _types(LOGIN_SIGNALS | REFUSALS | {"vm.crashed"} | NET_EVIDENCE), _failed_verification
)

# What each control's text asks for, as a test on one event.
EXPECTED: dict[str, dict[str, Callable[[dict[str, Any]], bool]]] = {
    "soc2": {
        "CC6.1": _types(AUTH),
        "CC6.2": _types(ACCOUNTS | TOKENS),
        "CC6.3": _types({"user.role_changed"}),
        "CC6.7": _types(TRANSFERS | EXPORTS),
        "CC7.2": _any(MONITORING, _types({"audit.chain_verified"})),
        "CC8.1": lambda e: _change(e["type"]),
    },
    "iso27001": {
        "A.5.16": _types({"user.created", "user.deactivated", "user.reactivated"}),
        "A.5.17": _types(TOKENS | {"user.password_changed"}),
        "A.5.18": _types({"user.role_changed"}),
        "A.8.2": _admin,
        "A.8.5": _types(AUTH),
        "A.8.13": _types(BACKUPS),
        "A.5.14": _types(TRANSFERS | EXPORTS),
        "A.8.15": _types({"audit.digest_signed", "audit.chain_verified"} | READS | HOLDS),
        "A.8.16": MONITORING,
        "A.8.32": lambda e: _change(e["type"]),
    },
    "hipaa": {
        "164.312(a)(1)": _types({"user.role_changed", "auth.token_rejected"} | TOKENS),
        "164.312(b)": _types({"audit.digest_signed", "audit.chain_verified"} | READS | EXPORTS),
        "164.312(c)(1)": _types({"audit.chain_verified"} | SNAPSHOT_CHECKS),
        "164.312(d)": _types({"auth.logged_in", "auth.logged_out", "auth.token_rejected"} | FAILED),
        "164.308(a)(5)(ii)(C)": _types(FAILED | LOCKED | {"auth.unlocked"}),
        "164.312(e)(1)": _types(TRANSFERS | {"audit.export_downloaded"}),
    },
    "pci_dss": {
        "6.5.1": lambda e: _change(e["type"]),
        "7.2": _types({"user.role_changed"} | TOKENS),
        "8.2": _types(ACCOUNTS),
        "8.3": _types(AUTH),
        "10.2": lambda e: e["actor_type"] in ("user", "anonymous"),
        "10.3": _types({"audit.digest_signed", "audit.chain_verified"} | HOLDS),
        "10.4": _types(READS | EXPORTS),
        "10.7": _any(_failed_verification, _types(REFUSALS)),
    },
    "gdpr": {
        "Art. 5(1)(f)": _types(
            {"auth.token_rejected", "audit.chain_verified"} | LOCKED | SNAPSHOT_CHECKS
        ),
        "Art. 25": _types({"user.role_changed", "token.created"}),
        "Art. 30": _types(TRANSFERS | COMMANDS | {"vm.console_opened", "vm.console_closed"}),
        "Art. 32": _types(BACKUPS | {"vm.crashed", "audit.chain_verified"}),
        "Art. 33": _any(_types(LOGIN_SIGNALS | REFUSALS), _failed_verification),
    },
}


def _period() -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    return now - timedelta(hours=1), now + timedelta(hours=1)


def _events(since: datetime, until: datetime) -> list[dict[str, Any]]:
    return list(
        Event.objects.filter(recorded_at__gte=since, recorded_at__lt=until)
        .order_by("position")
        .values("position", "type", "data", "actor_type")
    )


def _failed_check(auditor: Any) -> None:
    """A failed verification in the period, without breaking the chain for good."""
    store.append(
        "audit",
        "chain",
        "audit.chain_verified",
        {"ok": False, "checked": 3, "last_position": 3, "problem": "position 2: altered: test"},
        actor=Actor.for_user(auditor, channel="api"),
    )


@pytest.mark.parametrize("framework", sorted(EXPECTED))
def test_each_control_lists_exactly_the_evidence_its_definition_asks_for(
    mix: Mix, framework: str
) -> None:
    _failed_check(mix.auditor)
    since, until = _period()
    events = _events(since, until)
    report = reports.build(framework, since, until)
    rows = {r["id"]: r for r in report.control_rows()}
    assert set(rows) == set(EXPECTED[framework])
    for control_id, asks in EXPECTED[framework].items():
        expected = [e["position"] for e in events if asks(e)]
        assert rows[control_id]["evidence"] == expected, control_id
        assert rows[control_id]["status"] != "no evidence" or not expected


def _narrow_period(make_user: Callable[..., Any]) -> tuple[datetime, datetime, Any]:
    """A period holding one login, one command in a guest and one passing verification."""
    auditor = make_user("auditor")
    operator = make_user("operator")
    since = datetime.now(UTC)
    accounts.record_login(Actor.for_user(auditor, channel="dashboard"), auditor)
    store.append(
        "vm",
        "11111111-2222-3333-4444-555555555555",
        "vm.exec_completed",
        {"argv": ["true"], "exit_code": 0},
        actor=Actor.for_user(operator, channel="api"),
    )
    verify_chain(Actor.for_user(auditor, channel="api"))
    return since, datetime.now(UTC) + timedelta(seconds=1), auditor


NARROW_STATUS: dict[str, dict[str, str]] = {
    "soc2": {
        "CC6.1": "evidenced",
        "CC6.2": "no evidence",
        "CC6.3": "no evidence",
        "CC6.7": "no evidence",  # a command is not a transfer
        "CC7.2": "evidenced",
        "CC8.1": "no evidence",
    },
    "iso27001": {
        "A.5.16": "no evidence",
        "A.5.17": "no evidence",
        "A.5.18": "no evidence",
        "A.8.2": "no evidence",
        "A.8.5": "evidenced",
        "A.8.13": "no evidence",  # no snapshot: no backup evidence, whatever else happened
        "A.5.14": "no evidence",
        "A.8.15": "evidenced",
        "A.8.16": "no evidence",  # a passing verification is no anomaly
        "A.8.32": "no evidence",
    },
    "hipaa": {
        "164.312(a)(1)": "no evidence",
        "164.312(b)": "evidenced",
        "164.312(c)(1)": "evidenced",
        "164.312(d)": "evidenced",
        "164.308(a)(5)(ii)(C)": "no evidence",  # a successful login is no discrepancy
        "164.312(e)(1)": "no evidence",  # no transfer
    },
    "pci_dss": {
        "6.5.1": "no evidence",
        "7.2": "no evidence",
        "8.2": "no evidence",
        "8.3": "evidenced",
        "10.2": "evidenced",
        "10.3": "evidenced",
        "10.4": "no evidence",
        "10.7": "no evidence",
    },
    "gdpr": {
        "Art. 5(1)(f)": "evidenced",
        "Art. 25": "no evidence",
        "Art. 30": "evidenced",
        "Art. 32": "evidenced",
        "Art. 33": "no evidence",  # successful logins are not breach signals
    },
}


@pytest.mark.parametrize("framework", sorted(NARROW_STATUS))
def test_a_control_without_its_evidence_says_no_evidence(
    make_user: Callable[..., Any], framework: str
) -> None:
    since, until, _ = _narrow_period(make_user)
    report = reports.build(framework, since, until)
    assert {r["id"]: r["status"] for r in report.control_rows()} == NARROW_STATUS[framework]
    for row in report.control_rows():
        assert (row["events"] == 0) == (row["status"] == "no evidence"), row["id"]


@pytest.mark.parametrize(
    ("framework", "a", "b"),
    [
        ("soc2", "CC6.2", "CC6.3"),
        ("hipaa", "164.312(d)", "164.308(a)(5)(ii)(C)"),
        ("pci_dss", "7.2", "8.2"),
    ],
)
def test_distinct_controls_hold_distinct_evidence(mix: Mix, framework: str, a: str, b: str) -> None:
    since, until = _period()
    rows = {r["id"]: r for r in reports.build(framework, since, until).control_rows()}
    assert rows[a]["events_by_type"] and rows[b]["events_by_type"]
    assert set(rows[a]["events_by_type"]) != set(rows[b]["events_by_type"])
    assert set(rows[a]["evidence"]) != set(rows[b]["evidence"])
    if (framework, a) == ("soc2", "CC6.2"):
        # Issuing a token is registration, never a removal of access.
        assert "token.created" not in rows[b]["events_by_type"]


@pytest.mark.parametrize("framework", sorted(EXPECTED))
def test_no_two_controls_of_a_framework_hold_the_same_evidence(mix: Mix, framework: str) -> None:
    _failed_check(mix.auditor)
    since, until = _period()
    seen: dict[tuple[int, ...], str] = {}
    for row in reports.build(framework, since, until).control_rows():
        assert isinstance(row["evidence"], list), "evidence is the list of positions counted"
        key = tuple(row["evidence"])
        if key:
            assert key not in seen, f"{row['id']} holds the same evidence as {seen[key]}"
            seen[key] = row["id"]
