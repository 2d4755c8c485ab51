"""The lifecycle table (``vms.lifecycle``) drives everything a VM verb needs.

Every verb of the table has its catalogue entries, its command rule, its projector states, its
worker handler, its reconciler rule and its API action (with the token scope), and nothing
outside the table defines one: the verbs, types and actions found in each place are compared
with the table's, both ways.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import PermissionDenied
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from accounts.caller import Caller
from accounts.models import APIToken
from audit import catalogue, compliance
from audit.catalogue import EventType
from audit.projectors import ActivityProjector
from tests.astutil import parse
from vms import (
    api,
    commands,
    lifecycle,
    network_api,
    network_views,
    policy,
    pool_api,
    pool_views,
    preview_api,
    preview_views,
    projectors,
    quota_views,
    reconcile,
    views,
    worker,
)
from vms.models import VMState

ROOT = Path(__file__).resolve().parents[2]
VM_AGGREGATES = ("vm", "snapshot", "network", "pool")
READS = {"list", "retrieve", "events", "fork_status"}

# The VM domain's event types as recorded logs hold them: name, aggregate, schema version and
# category must never change (a log appended before must stay valid and report the same).
RECORDED = {
    "net.dns_lookups": ("vm", 1, "monitoring"),
    "net.egress_policy_changed": ("vm", 1, "change"),
    "net.egress_refused": ("vm", 1, "monitoring"),
    "net.network_created": ("network", 1, "change"),
    "pool.target_set": ("pool", 1, "change"),
    "pool.vm_evicted": ("pool", 1, "operations"),
    "pool.vm_handed_out": ("pool", 1, "operations"),
    "pool.vm_warmed": ("pool", 1, "operations"),
    "pool.vm_warming": ("pool", 1, "operations"),
    "net.network_deleted": ("network", 1, "change"),
    "net.network_updated": ("network", 1, "change"),
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
    "vm.agent_credential_rotated": ("vm", 1, "access"),
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
    "vm.lifetime_set": ("vm", 1, "change"),
    "vm.idle_policy_set": ("vm", 1, "change"),
    "vm.preview_link_created": ("vm", 1, "access"),
    "vm.preview_link_revoked": ("vm", 1, "access"),
    "vm.progress": ("vm", 1, "operations"),
    "vm.recovered": ("vm", 1, "monitoring"),
    "vm.ballooned": ("vm", 1, "monitoring"),
    "vm.balloon_released": ("vm", 1, "monitoring"),
    "vm.cpu_lowered": ("vm", 1, "monitoring"),
    "vm.cpu_restored": ("vm", 1, "monitoring"),
    "vm.priority_set": ("vm", 1, "change"),
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
    pool_types = {t.name for t in lifecycle.POOL_EVENTS}
    assert names - pool_types <= projectors.VMProjector.event_types
    assert pool_types == projectors.PoolProjector.event_types
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
    # An attribute or a name compared (``vm.owner_id == ...``, ``... != caller.owner``), not a
    # string that happens to read "owner" (a column's name).
    checked = re.compile(r"owner(_id)?\s*[!=]=|[!=]=\s*[\w.]*owner(_id)?\b")
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


# --- Every route of the product: what changes a VM is a verb of the table -----------------------

# The functions through which a view changes a VM: the VM commands and guest access.
# vms.pools: a create served from a warm pool (vms.commands.create underneath).
CHANGING_MODULES = ("vms.commands", "vms.guest", "vms.pools")


def _routes() -> list[tuple[str, Any]]:
    """(route, view) for every URL pattern of the product, walking includes."""
    found: list[tuple[str, Any]] = []

    def walk(patterns: Any, prefix: str) -> None:
        for p in patterns:
            if isinstance(p, URLResolver):
                walk(p.url_patterns, prefix + str(p.pattern))
            elif isinstance(p, URLPattern):
                found.append((prefix + str(p.pattern), p.callback))

    walk(get_resolver("sandbox_site.urls").url_patterns, "")
    return found


def _view_of(callback: Any) -> Any:
    """The function or class a URL pattern's callback runs (as_view and decorators unwrapped)."""
    for attr in ("cls", "view_class"):
        if getattr(callback, attr, None) is not None:
            return getattr(callback, attr)
    return inspect.unwrap(callback)


def _changes_a_vm(view: Any, _seen: set[Any] | None = None) -> set[str]:
    """The names of VM-changing functions (``CHANGING_MODULES``) the view's code calls, itself or
    through the functions of its own module it calls."""
    seen = set() if _seen is None else _seen
    if view in seen:
        return set()
    seen.add(view)
    try:
        source = inspect.getsource(view)
    except (OSError, TypeError):
        return set()
    module = inspect.getmodule(view)
    namespace = vars(module)
    called: set[str] = set()
    for node in ast.walk(parse(textwrap.dedent(source))):
        if isinstance(node, ast.Name):
            local = namespace.get(node.id)
            if inspect.isfunction(local) and local.__module__ == module.__name__:
                called |= _changes_a_vm(local, seen)
        target: Any = None
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            base = namespace.get(node.value.id)
            if inspect.ismodule(base) and base.__name__ in CHANGING_MODULES:
                target = getattr(base, node.attr, None)
        elif isinstance(node, ast.Name):
            target = namespace.get(node.id)
        if callable(target) and getattr(target, "__module__", "") in CHANGING_MODULES:
            called.add(f"{target.__module__}.{target.__name__}")
    return called


def _table_routes() -> dict[Any, frozenset[str]]:
    """The views that carry out verbs, and which: the API's viewsets (their actions are checked
    against the table above) and the dashboard's pages (their verbs derived from the table)."""
    return {
        api.VMViewSet: frozenset(
            v.name for v in lifecycle.VERBS if v.api is not None and v.api.resource == "vms"
        ),
        api.SnapshotViewSet: frozenset(
            v.name for v in lifecycle.VERBS if v.api is not None and v.api.resource == "snapshots"
        ),
        inspect.unwrap(views.vm_action): views.PAGE_VERBS,
        inspect.unwrap(views.snapshot_action): frozenset(views.SNAPSHOT_VERBS),
        inspect.unwrap(views.vm_create): frozenset({"create"}),
        # The list's bulk actions: one verb of BULK_VERBS per request, each VM through the commands.
        inspect.unwrap(views.vm_bulk): frozenset(views.BULK_VERBS),
        inspect.unwrap(views.vm_exec): frozenset({"exec"}),
        # The console's SysRq menu: a fixed script run through the exec verb.
        inspect.unwrap(views.vm_sysrq): frozenset({"exec"}),
        # The page's lifetime form: a record verb with input of its own.
        inspect.unwrap(views.vm_lifetime): frozenset({"set_lifetime"}),
        # The page's fork and idle policy forms: record verbs with input of their own.
        inspect.unwrap(views.vm_fork): frozenset({"fork"}),
        inspect.unwrap(views.vm_idle): frozenset({"set_idle"}),
        # A record verb with input of its own, routed apart (its row says where: api=None).
        preview_api.PreviewLinkView: frozenset({"share_preview", "revoke_preview"}),
        preview_api.PreviewLinkDetailView: frozenset({"revoke_preview"}),
        inspect.unwrap(preview_views.vm_preview): frozenset({"share_preview"}),
        inspect.unwrap(preview_views.vm_preview_revoke): frozenset({"revoke_preview"}),
        # A VM's NIC (vms.network_api); networks are not VMs: their commands are admins'.
        network_api.PortForwardViewSet: frozenset({"add_port_forward", "remove_port_forward"}),
        network_api.EgressView: frozenset({"set_egress"}),
        network_api.NetworkViewSet: frozenset(),
        inspect.unwrap(network_views.network_list): frozenset(),
        inspect.unwrap(network_views.network_edit): frozenset(),
        inspect.unwrap(network_views.network_delete): frozenset(),
        # Quotas and team budgets (vms.commands.set_quota, set_group_budget) limit VMs but change
        # none: their commands are admins' and drive no verb of the table.
        api.UserQuotaView: frozenset(),
        api.GroupQuotaView: frozenset(),
        api.GroupBudgetView: frozenset(),
        inspect.unwrap(quota_views.quota_admin): frozenset(),
        # Warm pool targets (vms.commands.set_pool_target): an admin's setting; pool members are
        # no VMs until a create (the table's) hands one out.
        pool_api.PoolTargetView: frozenset(),
        pool_api.PoolsView: frozenset(),  # reads them (vms.pools.report)
        # The dashboard's pools page (vms.pool_views): the same report and the same command.
        inspect.unwrap(pool_views.pool_list): frozenset(),
        inspect.unwrap(pool_views.pool_target): frozenset(),
    }


def test_every_route_that_changes_a_vm_is_a_route_of_the_tables_verbs() -> None:
    """Resolve every URL of the product to its view: one that calls a VM command or guest
    access is one of the table's routes; any other view (an APIView, a dashboard page) that
    changes a VM would be a verb outside the table."""
    table_routes = _table_routes()
    verbs = {v.name for v in lifecycle.VERBS}
    for routed in table_routes.values():
        assert routed <= verbs
    seen = set()
    for route, callback in _routes():
        view = _view_of(callback)
        changes = _changes_a_vm(view)
        if changes:
            assert view in table_routes, f"{route} ({view.__qualname__}) calls {sorted(changes)}"
            seen.add(view)
    assert seen == set(table_routes), "a route of the table is not routed"


def test_the_route_check_sees_a_view_outside_the_table(tmp_path, monkeypatch) -> None:
    """The check above finds what the table does not drive: an APIView calling
    ``commands.perform(..., "stop")``, a dashboard page calling ``perform(..., "pause")`` through
    a helper of its module."""
    (tmp_path / "extra_routes.py").write_text(
        "from vms import commands\n"
        "from vms.commands import perform\n\n"
        "class Stopper:\n"
        "    def post(self, request, pk):\n"
        "        commands.perform(request.caller, pk, 'stop')\n\n"
        "def _pause(request, vm):\n"
        "    perform(request.caller, vm, 'pause')\n\n"
        "def pause_page(request, pk):\n"
        "    _pause(request, pk)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    extra = importlib.import_module("extra_routes")
    assert _changes_a_vm(extra.Stopper) == {"vms.commands.perform"}
    assert _changes_a_vm(extra.pause_page) == {"vms.commands.perform"}
    assert extra.Stopper not in _table_routes()


def test_the_dashboard_snapshot_actions_are_the_tables() -> None:
    assert set(views.SNAPSHOT_VERBS) == {
        v.name for v in lifecycle.VERBS if v.api is not None and v.api.resource == "snapshots"
    }
    assert [a["verb"] for a in views.SNAPSHOT_ACTIONS] == list(views.SNAPSHOT_VERBS)
    # The page's script enables buttons by the table's rules (states, overtaking), never its own.
    for v in lifecycle.VERBS:
        if v.allowed_from:
            assert views.RULES_JSON[v.name] == {
                "from": sorted(v.allowed_from),
                "overtakes": v.overtakes,
            }
    script = (ROOT / "frontend" / "src" / "vmdetail.js").read_text()
    # A list of states written in the script is a rule of its own (it may show a state).
    states = "|".join(sorted(lifecycle.ALL_STATES))
    listed = re.findall(rf"""\[\s*["']({states})["']""", script)
    assert listed == [], f"vmdetail.js lists states {listed}"
    # Nor does it single out a verb (destroy's overtaking is the rule's "overtakes").
    singled = re.findall(r"""verb\s*[!=]==?\s*["'](\w+)["']""", script)
    assert singled == [], f"vmdetail.js decides for verbs {singled}"
    template = (ROOT / "templates" / "vms" / "detail.html").read_text()
    assert not re.search(r"snapshot-action' vm\.pk s\.pk '", template), "a snapshot verb by hand"


# --- States: written only by the table ----------------------------------------------------------

# Modules of vms/ that may name a VM state, and why. Each names the state a VMM is really in,
# which is data (an outcome's ``data["state"]``, which the table lets override its row) or a
# reading, never a rule of which verb may run nor a transition of its own.
STATE_READERS = {
    "lifecycle.py": "the table",
    "models.py": "VMState, the column's choices (the table's states: test above)",
    "worker.py": "an outcome reports the state the VMM was left in (data['state'])",
    "reconcile.py": "reports what it finds a VMM in (vm.crashed, vm.recovered data)",
    "metrics_live.py": "samples guests whose VMM runs; decides no verb and moves no state",
}


def _state_uses(tree: ast.AST) -> list[str]:
    """VM state literals where a state is compared, assigned or filtered on, and VMState members."""
    found: list[str] = []

    def is_state(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and node.value in lifecycle.ALL_STATES

    def mentions_state(node: ast.AST) -> bool:
        return "state" in ast.unparse(node)

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and ast.unparse(node.value).endswith("VMState"):
            if node.attr.isupper():
                found.append(ast.unparse(node))
        elif isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
            literals = [n for p in parts for n in ast.walk(p) if is_state(n)]
            if literals and any(mentions_state(p) for p in parts):
                found.append(ast.unparse(node))
        elif isinstance(node, ast.keyword) and node.arg and "state" in node.arg:
            if any(is_state(n) for n in ast.walk(node.value)):
                found.append(ast.unparse(node))
        elif isinstance(node, ast.Assign):
            # A VM's state attribute (a request's status in an answer body is not a VM state).
            targets = [t for t in node.targets if isinstance(t, ast.Attribute)]
            if any(t.attr == "state" for t in targets) and any(
                is_state(n) for n in ast.walk(node.value)
            ):
                found.append(ast.unparse(node))
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("_set_state"):
            if any(is_state(n) for a in node.args for n in ast.walk(a)):
                found.append(ast.unparse(node))
    return found


def test_no_module_of_the_vm_domain_writes_a_state_rule_or_transition_of_its_own() -> None:
    """A VM state named in a comparison, an assignment or a filter outside the table is a rule
    or a transition the table does not drive (the projector included: its states come from the
    table). The hypervisor drivers know no VM states, only their VMM's."""
    for path in sorted((ROOT / "vms").rglob("*.py")):
        rel = path.relative_to(ROOT / "vms")
        if rel.parts[0] in ("migrations", "hypervisors") or str(rel) in STATE_READERS:
            continue
        uses = _state_uses(parse(path.read_text()))
        assert uses == [], f"vms/{rel} writes VM states itself: {uses}"


def test_the_state_scan_sees_a_rule_and_a_transition() -> None:
    rule = "def record_input(vm):\n    if vm.state != 'running':\n        raise InvalidState()\n"
    moved = (
        "vm.state = 'paused'\n"
        "self._set_state(vm, 'crashed', at)\n"
        "VirtualMachine(state=VMState.STOPPED)\n"
        "VirtualMachine.objects.filter(pk=pk).update(state='stopped')\n"
    )
    assert _state_uses(parse(rule))
    assert len(_state_uses(parse(moved))) == 4


# --- Ownership and permissions: decided in vms.policy only --------------------------------------

OWNERSHIP = re.compile(
    r"\.owner_id\s*[!=]=|[!=]=\s*\S*\.owner_id\b|\bowner\.pk\b|\.filter\(\s*owner(_id)?\s*=|"
    r"\bowner__\w+\s*="
)
VM_PERMISSION_ASKED = re.compile(
    r"""(has_perm|caller\.has|\.require)\(\s*f?["']vms\.|perms\.vms\.|["']vms\.["']\s*\+|"""
    r"""f["']vms\.\{"""
)
# Where an owner is named for another reason than deciding access, and why.
OWNERSHIP_ALLOWED = {
    # The list pages filter by an owner the reader chose, inside policy.visible_vms.
    "vms/views.py": 'owner__username=f["owner"]',
    # A new VM's name is unique among its owner's live VMs: a rule of names, not of access.
    "vms/commands.py": "filter(owner_id=OWNER_STAND_IN, name=NAME_STAND_IN)",
}

# The pages and the API read VMs and snapshots through vms.policy (visible_vms,
# visible_snapshots), never from the whole table; what stays, and why.
UNSCOPED_READS = re.compile(r"\b(VirtualMachine|Snapshot)\.objects\.(?!none\(\))")
UNSCOPED_ALLOWED = {
    # The events of a VM the caller sees include those of its snapshots, by id.
    "vms/api.py": 'Snapshot.objects.filter(vm=vm).values_list("pk", flat=True)',
}


def test_no_module_decides_ownership_or_vm_permissions_outside_the_policy() -> None:
    files = [
        *sorted((ROOT / "vms").rglob("*.py")),
        *sorted((ROOT / "sandbox_site").rglob("*.py")),
        *sorted((ROOT / "templates").rglob("*.html")),
    ]
    for path in files:
        rel = str(path.relative_to(ROOT))
        if rel == "vms/policy.py" or "/migrations/" in rel:
            continue
        source = path.read_text()
        allowed = OWNERSHIP_ALLOWED.get(rel)
        for match in OWNERSHIP.finditer(source):
            line = source[source.rfind("\n", 0, match.start()) + 1 : source.find("\n", match.end())]
            assert allowed and allowed in line, f"{rel} decides ownership itself: {line.strip()}"
        if rel in ("vms/views.py", "vms/api.py"):
            for match in UNSCOPED_READS.finditer(source):
                line = source[match.start() : source.find("\n", match.end())]
                assert rel in UNSCOPED_ALLOWED and UNSCOPED_ALLOWED[rel] in line, (
                    f"{rel} reads past the policy: {line.strip()}"
                )
        asked = VM_PERMISSION_ASKED.search(source)
        assert asked is None, f"{rel} asks a VM permission itself: {asked.group(0)}"


def test_the_ownership_scan_sees_the_ways_of_checking() -> None:
    for bad in (
        "if vm.owner_id == request.user.pk:",
        "if request.user.pk != vm.owner_id:",
        "vm.owner.pk",
        "VirtualMachine.objects.filter(owner=user)",
        "qs.filter(owner_id=OWNER_STAND_IN)",
        "qs.filter(owner__username=name)",
    ):
        assert OWNERSHIP.search(bad), bad
    for bad in (
        "user.has_perm('vms.exec_vm')",
        'caller.has("vms.operate_vm")',
        "{% if perms.vms.add_virtualmachine %}",
        "user.has_perm('vms.' + verb)",
        "user.has_perm(f'vms.{verb}_vm')",
    ):
        assert VM_PERMISSION_ASKED.search(bad), bad
