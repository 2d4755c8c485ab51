"""The lifecycle table (``vms.lifecycle``) drives everything a VM verb needs.

Every verb of the table has its catalogue entries, its command rule, its projector states, its
worker handler, its reconciler rule and its API action (with the token scope), and nothing
outside the table defines one: the verbs, types and actions found in each place are compared
with the table's, both ways.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import PermissionDenied
from django.urls import reverse

from accounts.caller import Caller
from accounts.models import APIToken
from audit import catalogue, compliance
from audit.catalogue import EventType
from audit.projectors import ActivityProjector
from tests.astutil import parse
from vms import api, commands, lifecycle, policy, projectors, reconcile, views, worker
from vms.models import VMState

ROOT = Path(__file__).resolve().parents[2]
VM_AGGREGATES = ("vm", "snapshot")
READS = {"list", "retrieve", "events"}

# The VM domain's event types as recorded logs hold them: name, aggregate, schema version and
# category must never change (a log appended before must stay valid and report the same).
RECORDED = {
    "net.ip_leased": ("vm", 1, "change"),
    "net.ip_released": ("vm", 1, "change"),
    "net.port_forward_added": ("vm", 1, "change"),
    "net.port_forward_removed": ("vm", 1, "change"),
    "snapshot.corrupted": ("snapshot", 1, "data"),
    "snapshot.created": ("snapshot", 1, "data"),
    "snapshot.deleted": ("snapshot", 1, "data"),
    "snapshot.verified": ("snapshot", 1, "data"),
    "vm.console_closed": ("vm", 1, "access"),
    "vm.console_opened": ("vm", 1, "access"),
    "vm.crashed": ("vm", 1, "monitoring"),
    "vm.create_requested": ("vm", 1, "change"),
    "vm.created": ("vm", 1, "change"),
    "vm.exec_completed": ("vm", 1, "data"),
    "vm.exec_failed": ("vm", 1, "data"),
    "vm.exec_requested": ("vm", 1, "data"),
    "vm.file_download_failed": ("vm", 1, "data"),
    "vm.file_download_requested": ("vm", 1, "data"),
    "vm.file_downloaded": ("vm", 1, "data"),
    "vm.file_upload_failed": ("vm", 1, "data"),
    "vm.file_upload_requested": ("vm", 1, "data"),
    "vm.file_uploaded": ("vm", 1, "data"),
    "vm.preview_link_created": ("vm", 1, "access"),
    "vm.progress": ("vm", 1, "operations"),
    "vm.recovered": ("vm", 1, "monitoring"),
    **{
        name: ("vm", 1, "change")
        for verb, done in (
            ("start", "started"),
            ("stop", "stopped"),
            ("reboot", "rebooted"),
            ("pause", "paused"),
            ("resume", "resumed"),
            ("resize", "resized"),
            ("snapshot", "snapshotted"),
            ("restore", "restored"),
            ("destroy", "destroyed"),
        )
        for name in (f"vm.{verb}_requested", f"vm.{done}", f"vm.{verb}_failed")
    },
}


def _vm_domain_types() -> dict[str, EventType]:
    return {t.name: t for t in catalogue.all_types() if t.aggregate_type in VM_AGGREGATES}


# --- The catalogue ------------------------------------------------------------------------------


def test_every_verb_has_its_event_types_in_the_catalogue() -> None:
    for verb in lifecycle.VERBS:
        for name in verb.event_types():
            t = catalogue.get(name)
            assert t is not None, f"{verb.name}: {name} is not catalogued"
            assert t.aggregate_type in VM_AGGREGATES
        if verb.kind in ("request", "guest"):
            assert verb.requested == f"vm.{verb.name}_requested"
            assert verb.failed == f"vm.{verb.name}_failed"


def test_the_vm_part_of_the_catalogue_is_the_tables_and_nothing_else() -> None:
    assert set(_vm_domain_types()) == {t.name for t in lifecycle.event_types()}
    # No type of another domain claims a VM aggregate, nor does audit define one itself.
    source = (ROOT / "audit" / "catalogue.py").read_text()
    assert not re.search(r"""["'](vm|snapshot|net)\.[a-z_]+["']""", source)


def test_the_vm_domain_types_are_those_recorded_logs_hold() -> None:
    found = {
        name: (t.aggregate_type, t.schema_version, t.category)
        for name, t in _vm_domain_types().items()
    }
    assert found == RECORDED


def test_readers_of_the_catalogue_see_the_vm_types() -> None:
    """The table registers while the apps load: projector subscriptions and the compliance
    mapping, derived from the catalogue when their modules are imported, hold the VM types."""
    names = {t.name for t in lifecycle.event_types()}
    assert names <= ActivityProjector.event_types
    assert names <= projectors.VMProjector.event_types
    assert {"vm.started", "vm.destroy_requested"} <= compliance.CHANGES


def test_registering_is_idempotent_and_refuses_conflicts_and_latecomers() -> None:
    existing = catalogue.get("vm.started")
    assert existing is not None
    catalogue.register(existing)  # the same definition again: nothing changes
    assert catalogue.get("vm.started") is existing
    changed = EventType("vm.started", "vm", 2, "change", "another shape")
    with pytest.raises(RuntimeError, match="already defined differently"):
        catalogue.register(changed)
    late = EventType("vm.teleported", "vm", 1, "change", "registered after the first read")
    with pytest.raises(RuntimeError, match="after the catalogue was read"):
        catalogue.register(late)
    assert catalogue.get("vm.teleported") is None


# --- Commands, projector, worker, reconciler ----------------------------------------------------


def test_the_command_rules_are_the_tables() -> None:
    assert commands.RULES == {
        v.name: (v.permission, v.allowed_from) for v in lifecycle.REQUEST_VERBS
    }
    assert set(commands.GUEST_ACCESS) == {v.name for v in lifecycle.GUEST_VERBS}
    # The verbs with a command of their own (their input) are worker's verbs of the table; the
    # others go through the generic one.
    assert set(commands.WITH_INPUT) <= {v.name for v in lifecycle.REQUEST_VERBS}


def test_commands_name_no_request_or_outcome_type_of_their_own() -> None:
    """The command and worker modules take request and outcome types from the table: a verb
    type written there by hand would be a verb the table does not drive."""
    verb_types = {t for v in lifecycle.VERBS for t in (v.requested, v.succeeded, v.failed) if t}
    for module in ("commands.py", "worker.py", "reconcile.py", "guest.py", "api.py", "views.py"):
        tree = parse((ROOT / "vms" / module).read_text())
        named = {
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
        # The worker's handlers answer their success type (checked against the table).
        allowed = {v.succeeded for v in lifecycle.REQUEST_VERBS} if module == "worker.py" else set()
        assert (named & verb_types) - allowed == set(), module
        assert not any(re.fullmatch(r"vm\.[a-z_]+_(requested|failed)", n) for n in named), module


def test_the_projector_states_are_the_tables() -> None:
    assert projectors.REQUESTED == {v.requested: v.transitional for v in lifecycle.REQUEST_VERBS}
    expected = {}
    for v in lifecycle.REQUEST_VERBS:
        expected[v.succeeded] = v.settles_to
        expected[v.failed] = v.fails_to
    assert projectors.OUTCOMES == expected
    assert projectors.FAILURES == {v.failed for v in lifecycle.REQUEST_VERBS}


def test_the_tables_states_are_the_models() -> None:
    assert lifecycle.ALL_STATES == {s.value for s in VMState}
    for v in lifecycle.VERBS:
        assert v.allowed_from <= lifecycle.ALL_STATES, v.name
        for state in (v.transitional, v.settles_to, v.fails_to):
            assert state is None or state in lifecycle.ALL_STATES, (v.name, state)
    # Each transitional state belongs to one verb: a VM's state names what it is busy with.
    transitional = [v.transitional for v in lifecycle.REQUEST_VERBS]
    assert len(transitional) == len(set(transitional))


def test_every_worker_verb_has_its_handler_and_no_handler_is_outside_the_table() -> None:
    assert set(worker.HANDLERS) == {v.name for v in lifecycle.REQUEST_VERBS}
    for v in lifecycle.REQUEST_VERBS:
        assert worker.HANDLERS[v.name] is getattr(worker, f"do_{v.name}")
        assert v.handler == f"do_{v.name}"
        assert v.on_interrupt is not None
    handlers = {
        name
        for name, fn in inspect.getmembers(worker, inspect.isfunction)
        if name.startswith("do_") and fn.__module__ == "vms.worker"
    }
    assert handlers == {v.handler for v in lifecycle.REQUEST_VERBS}
    assert worker.LAUNCHING_VERBS == {v.name for v in lifecycle.REQUEST_VERBS if v.launches_vmm}


def test_a_row_without_its_handler_fails_the_worker_at_import(monkeypatch) -> None:
    ghost = lifecycle.Verb(
        name="teleport",
        kind="request",
        permission="vms.operate_vm",
        description="",
        api=None,
        handler="do_teleport",
    )
    monkeypatch.setattr(lifecycle, "REQUEST_VERBS", (*lifecycle.REQUEST_VERBS, ghost))
    with pytest.raises(ImportError, match="do_teleport"):
        worker._handlers()


def test_the_reconciler_settles_by_the_table() -> None:
    """What an interrupted request comes to is the row's ``on_interrupt``: the reconciler
    names no verb."""
    tree = parse(inspect.getsource(reconcile))
    named = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    assert named & {v.name for v in lifecycle.VERBS} == set()


# --- The API and the dashboard ------------------------------------------------------------------


def _actions(viewset: Any) -> dict[str, set[str]]:
    """action name -> HTTP methods, for every operation of ``viewset`` that is not a read."""
    found: dict[str, set[str]] = {}
    for extra in viewset.get_extra_actions():
        found[extra.__name__] = set(extra.mapping)
    for name, method in (("create", "post"), ("destroy", "delete")):
        if hasattr(viewset, name):
            found[name] = {method}
    return {name: methods for name, methods in found.items() if name not in READS}


@pytest.mark.parametrize(
    ("resource", "viewset"), [("vms", api.VMViewSet), ("snapshots", api.SnapshotViewSet)]
)
def test_every_api_action_is_a_verb_of_the_table_and_every_verb_has_one(
    resource: str, viewset: Any
) -> None:
    expected: dict[str, set[str]] = {}
    for v in lifecycle.VERBS:
        if v.api is not None and v.api.resource == resource:
            expected.setdefault(v.api.action, set()).update(v.api.methods)
    assert _actions(viewset) == expected
    # Each verb action's token scope is the verb's permission.
    for v in lifecycle.VERBS:
        if v.api is not None and v.api.resource == resource:
            for method in v.api.methods:
                assert viewset.token_scopes[f"{v.api.action}:{method}"].any_of == {v.permission}


def test_every_worker_verb_on_a_vm_is_routed() -> None:
    for v in lifecycle.REQUEST_VERBS:
        assert v.api is not None, v.name
        if v.api.resource == "vms" and v.api.methods == ("post",):
            url = reverse(f"vm-{v.name}", args=["5a4d0000-0000-4000-8000-0000c0ffee00"])
            assert url.endswith(f"/{v.name}/")


def test_the_dashboard_offers_the_tables_verbs() -> None:
    assert views.PAGE_VERBS == {
        v.name for v in lifecycle.REQUEST_VERBS if v.api is not None and v.api.resource == "vms"
    }
    # A new verb without input gets its button: only the form verbs and the destroy are apart.
    assert set(views.BUTTON_VERBS) == views.PAGE_VERBS - views.FORM_VERBS - {"destroy"}
    assert views.FORM_VERBS <= views.PAGE_VERBS


# --- The policy ---------------------------------------------------------------------------------

VM_PERMISSIONS = sorted({p for v in lifecycle.VERBS for p in v.permissions})


@pytest.mark.django_db
@pytest.mark.parametrize("verb", [v.name for v in lifecycle.VERBS])
def test_the_policy_asks_the_tables_permissions_and_ownership(verb: str, make_user) -> None:
    row = lifecycle.verb(verb)
    admin, other = make_user("admin"), make_user("operator")
    everything = Caller(user=admin, token=APIToken(scopes=[*VM_PERMISSIONS, policy.MANAGE_ALL]))
    assert policy.may(everything, verb, other.pk)
    policy.require(everything, verb, other.pk)
    for missing in row.permissions:
        narrowed = [p for p in VM_PERMISSIONS if p != missing] + [policy.MANAGE_ALL]
        caller = Caller(user=admin, token=APIToken(scopes=narrowed))
        assert not policy.may(caller, verb, admin.pk)
        with pytest.raises(PermissionDenied, match=missing):
            policy.require(caller, verb, admin.pk)
    own_only = Caller(user=admin, token=APIToken(scopes=VM_PERMISSIONS))
    assert policy.may(own_only, verb, admin.pk)
    if row.target == "new":
        assert policy.may(own_only, verb, None)
    else:
        assert not policy.may(own_only, verb, other.pk)
        with pytest.raises(PermissionDenied, match="your own"):
            policy.require(own_only, verb, other.pk)


def test_no_module_of_the_vm_domain_checks_ownership_itself() -> None:
    """Ownership and VM permissions are decided in vms.policy: no other module compares an
    owner with the caller or names a VM permission as a string."""
    checked = re.compile(r"owner(_id)?\s*[!=]=|[!=]=\s*\S*owner(_id)?\b")
    for path in sorted((ROOT / "vms").glob("*.py")):
        if path.name in ("policy.py", "lifecycle.py", "models.py"):
            continue
        source = path.read_text()
        assert not checked.search(source), f"{path.name} checks ownership itself"
        perms = {
            node.value
            for node in ast.walk(parse(source))
            if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value in VM_PERMISSIONS
        }
        assert perms == set(), f"{path.name} names {perms}: ask vms.policy with the verb"
