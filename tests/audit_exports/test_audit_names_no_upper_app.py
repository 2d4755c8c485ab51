"""Audit, a lower layer, names nothing of the VM domain: what it needs from it is registered.

import-linter sees imports only; these tests see the strings (event type names, URL names,
settings) through which a lower app could still depend on an upper one, and check that what
compliance counts follows the VM lifecycle table, through the evidence roles its event types
state, so that a verb added to the table is counted with no change to audit.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from django.test import Client

from audit import bundle, catalogue, compliance, sections
from vms import lifecycle, recordings

ROOT = Path(__file__).resolve().parents[2]
# Event type prefixes of the VM domain, its package, its URL namespaces, its settings.
FORBIDDEN = re.compile(
    r"\b(?:vm|snapshot|net)\.\w|\bvms\b|\brecordings:|SANDBOX_CONSOLE|\bconsole_dir\b"
)


def _audit_files() -> list[Path]:
    files = [p for p in (ROOT / "audit").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    files += [p for p in (ROOT / "templates" / "audit").rglob("*") if p.is_file()]
    return sorted(files)


def test_audit_holds_no_reference_to_the_vm_domain() -> None:
    found = []
    for path in _audit_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FORBIDDEN.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "audit names the VM domain (register it from vms instead):\n" + "\n".join(
        found
    )


def test_the_check_sees_each_kind_of_reference() -> None:
    for line in (
        'x = "vm.console_closed"',
        "'snapshot.created'",
        '"net.ip_leased"',
        "from vms import console",
        "{% url 'recordings:replay' e.position %}",
        'getattr(settings, "SANDBOX_CONSOLE_DIR", None)',
    ):
        assert FORBIDDEN.search(line), line
    for line in ("a VM crashed", "subnet.mask", "the snapshots table", "audit.exported"):
        assert not FORBIDDEN.search(line), line


def _run(script: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    return subprocess.run(  # noqa: S603 (fixed argv)
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compliance_loads_without_the_vm_domain() -> None:
    """Without the VM app, compliance counts audit's and accounts' types only (no ValueError)."""
    result = _run(
        """
        from audit import catalogue, compliance
        assert not compliance.CONSOLE and not compliance.TRANSFERS and not compliance.BACKUPS
        assert all(t.name.split(".")[0] != "vm" for t in catalogue.all_types())
        assert "auth.login_failed" in compliance.counted_types()
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_a_guest_verb_added_to_the_table_is_counted() -> None:
    """A guest verb added to the table, with its evidence role, is counted by every control that
    counts guest transfers; one that states no role is refused when the table is read."""
    result = _run(
        """
        from audit import catalogue
        from vms import lifecycle  # registers the table's types

        scan = lifecycle._guest(
            "file_list",
            "vms.read_files",
            succeeded="vm.file_listed",
            api=lifecycle.ApiRoute("vms", "files", ("get",)),
            time_limit="SANDBOX_GUEST_TRANSFER_TIMEOUT_S",
            evidence="guest_transfer",
        )
        lifecycle._GUEST_TEXT.update(
            {t: "A directory listing." for t in scan.event_types()}
        )
        catalogue.register(*lifecycle.event_types((*lifecycle.VERBS, scan)))

        from audit import compliance
        new = set(scan.event_types())
        assert new == {"vm.file_list_requested", "vm.file_listed", "vm.file_list_failed"}
        assert new <= compliance.TRANSFERS, compliance.TRANSFERS
        counting = {
            c.id
            for f in compliance.FRAMEWORKS.values()
            for c in f.controls
            if c.event_types is not None and new <= c.event_types
        }
        assert {"A.5.14", "164.312(e)(1)", "Art. 30"} <= counting, counting

        import dataclasses
        mute = dataclasses.replace(scan, name="file_stat", evidence=frozenset())
        try:
            lifecycle.event_types((*lifecycle.VERBS, mute))
        except ValueError as exc:
            assert "states no compliance evidence role" in str(exc)
        else:
            raise AssertionError("a guest verb without an evidence role was accepted")
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_compliance_sets_follow_the_lifecycle_table() -> None:
    by_role: dict[str, set[str]] = {}
    for t in lifecycle.event_types():
        for role in t.evidence:
            by_role.setdefault(role, set()).add(t.name)
    assert compliance.CONSOLE == frozenset(lifecycle.verb("console").records)
    assert compliance.COMMANDS == frozenset(by_role["guest_command"])
    assert compliance.TRANSFERS == frozenset(by_role["guest_transfer"])
    assert compliance.BACKUPS == frozenset(by_role["backup"])
    guest = {t for v in lifecycle.GUEST_VERBS for t in v.event_types()}
    assert guest == compliance.COMMANDS | compliance.TRANSFERS
    assert guest <= compliance.counted_types()
    for v in lifecycle.REQUEST_VERBS:
        if v.evidence:
            assert set(v.outcomes()) <= compliance.counted_types(), v.name
    not_appended = {t.name for t in lifecycle.event_types() if t.not_appended}
    assert not_appended <= set(compliance.NOT_EMITTED)


def test_an_evidence_role_must_be_known() -> None:
    with pytest.raises(ValueError, match="unknown evidence roles"):
        catalogue.EventType("x.y", "x", 1, "data", "X.", evidence=frozenset({"nonsense"}))
    with pytest.raises(ValueError, match="cannot be evidence"):
        catalogue.EventType("x.y", "x", 1, "data", "X.", frozenset({"backup"}), "", "not yet")
    with pytest.raises(KeyError):
        catalogue.with_role("nonsense")


def test_the_vm_domain_registers_its_section_and_attachment() -> None:
    assert recordings.SECTION in sections.registered()
    assert bundle._ATTACHMENTS[recordings.ATTACHMENT.event_type] == recordings.ATTACHMENT
    # A registration again is harmless; another definition for the same key is refused.
    sections.register(recordings.SECTION)
    with pytest.raises(RuntimeError):
        sections.register(sections.Section("sessions", "Other", "audit:trail"))
    with pytest.raises(RuntimeError):
        bundle.register_attachment(
            bundle.Attachment(recordings.ATTACHMENT.event_type, lambda d: None, lambda d: ".x")
        )


@pytest.mark.django_db
def test_the_auditor_navigation_links_the_registered_sessions_page(make_user) -> None:
    client = Client()
    client.force_login(make_user("auditor"))
    page = client.get("/audit/").content.decode()
    assert 'href="/audit/sessions/"' in page and "Console sessions" in page
    sessions_page = client.get("/audit/sessions/")
    assert sessions_page.status_code == 200
    assert 'class="active">Console sessions' in sessions_page.content.decode()
