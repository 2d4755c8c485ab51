"""Every event type the compliance mapping or docs/compliance.md names as evidence is in the
catalogue and is appended by the product somewhere: a report never presents as evidence what
cannot occur (review of issue 11: ``quota.changed`` was listed but nothing emitted it; issue 18
made quota changes events, so it is catalogued again, and appended)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from audit import catalogue, compliance
from tests.astutil import parse

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "compliance.md"
# Modules that name types to read them, not to append them.
READERS = {"catalogue.py", "compliance.py", "projectors.py", "reports.py", "access_review.py"}
READERS |= {"live.py", "integrity.py", "metrics.py", "views.py", "api.py", "export_api.py"}
# The VM domain's types are defined by its lifecycle table: appended are those of its verbs.
READERS |= {"lifecycle.py"}


def _counted() -> set[str]:
    names: set[str] = set()
    for framework in compliance.FRAMEWORKS.values():
        for control in framework.controls:
            for selector in control.counted:
                names |= set(selector.types or ())
    for rule in (*compliance.EXCEPTION_RULES, compliance.NO_VERIFICATION):
        names |= set(rule.event_types)
    return names


def _named_in_docs() -> set[str]:
    # Every dotted name in code style: event types (module names would fail the catalogue check).
    return set(re.findall(r"`([a-z]+\.[a-z_]+)`", DOCS.read_text()))


def _appended() -> set[str]:
    """Types the product appends: string constants outside the modules that only read them,
    and the event types of the VM verbs (their requests, outcomes and records)."""
    from vms import lifecycle

    found: set[str] = set()
    for app in ("audit", "accounts", "secretstore", "vms", "webhooks", "sandbox_site"):
        for path in (ROOT / app).rglob("*.py"):
            if path.name in READERS or "migrations" in path.parts:
                continue
            for node in ast.walk(parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    found.add(node.value)
    for verb in lifecycle.VERBS:
        found |= set(verb.event_types())
    return {t.name for t in catalogue.all_types()} & found


def test_every_counted_type_is_catalogued_and_appended() -> None:
    counted = _counted()
    assert {t for t in counted if catalogue.get(t) is None} == set()
    assert counted - _appended() == set()


def test_every_type_named_in_the_compliance_docs_is_catalogued_and_appended() -> None:
    named = _named_in_docs()
    assert named, "no event types found in docs/compliance.md"
    assert {t for t in named if catalogue.get(t) is None} == set()
    # The types not appended yet are named only where the page says so.
    assert named - _appended() == set(compliance.NOT_EMITTED)


def test_types_not_appended_are_counted_by_no_control_and_said_so() -> None:
    assert set(compliance.NOT_EMITTED).isdisjoint(_counted())
    assert set(compliance.NOT_EMITTED).isdisjoint(_appended())
    for name in compliance.NOT_EMITTED:
        assert name in compliance.NOT_EVIDENCE


def test_quota_changes_are_appended_and_counted_by_the_change_management_controls() -> None:
    quota_changed = catalogue.get("quota.changed")
    assert quota_changed is not None and quota_changed.category == "change"
    assert "quota.changed" in _appended()
    assert "quota.changed" not in compliance.NOT_EMITTED
    assert "quota.changed" not in compliance.NOT_EVIDENCE
    change_controls = {"soc2": "CC8.1", "iso27001": "A.8.32", "pci_dss": "6.5.1"}
    for framework, control_id in change_controls.items():
        (control,) = [c for c in compliance.FRAMEWORKS[framework].controls if c.id == control_id]
        assert control.counts_event("quota.changed", dict, "user"), control_id
