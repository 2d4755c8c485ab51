"""The VM lifecycle in one table: every verb a caller can ask of a VM or a snapshot.

A row says, for one verb, the permission it needs, the VM states it may be asked from, the state
the VM is in while it is carried out, the event types of its request and of its outcomes (with
the states they leave), the worker function that carries it out, what the reconciler does with
it when a worker died half-way, and where the REST API offers it. Everything else is derived
from this table:

- the VM part of the event catalogue (``audit.catalogue``; registered when this module is
  imported, which ``vms.apps`` does while the apps load, before anything reads the catalogue);
- the rules ``vms.commands`` checks (``vms.commands.RULES``) and the permission ``vms.policy``
  asks for;
- the states ``vms.projectors`` folds requests and outcomes into;
- the worker's dispatch (``vms.worker.HANDLERS``) and the reconciler's settling;
- the API's actions and their token scopes (``vms.api``) and the dashboard's actions.

What a new verb costs. A guest or record verb: a row here (and, for a record verb, its event
types' text in ``_RECORD_TYPES``). A request verb (the worker's): a row here; its handler in
``vms.worker`` (``do_<verb>``); and, since the VM's state names what it is busy with, a
transitional state of its own: a member of ``vms.models.VMState``, its migration (the field's
choices), its entry in ``ALL_STATES`` below, and its three new event types
(``vm.<verb>_requested``, the success type, ``vm.<verb>_failed``) added to ``RECORDED`` in the
test, since recorded logs will hold them. A verb that takes input also gets its command function
in ``vms.commands`` (its checks, ``WITH_INPUT``), its serializer in ``vms.api`` (``ACTION_INPUT``)
and, on the dashboard, its form in ``vms.views`` (``FORM_VERBS``). A test
(tests/vms/test_lifecycle_table.py) fails when any of these defines a verb, a state or an event
type that is not in this table, or misses one that is, and when a route changes a VM outside it.

Event type names and their categories are part of recorded logs: never rename one. This module
names states as strings (the values of ``vms.models.VMState``) and imports no model: it is read
while the apps load.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from audit import catalogue
from audit.catalogue import EventType

__all__ = [
    "ALL_STATES",
    "BALLOONABLE",
    "BROKEN",
    "EVENT_STATES",
    "GONE",
    "HOLDS_HOST",
    "HOLDS_UNPLACED",
    "ApiRoute",
    "GUEST_VERBS",
    "NETWORK_EVENTS",
    "OTHER_EVENTS",
    "POOL_EVENTS",
    "RECORD_VERBS",
    "REQUEST_VERBS",
    "Verb",
    "VERBS",
    "by_request",
    "event_types",
    "guest_verb",
    "outcome_states",
    "request_verb",
    "may_idle",
    "may_while_on_disk",
    "stays_on_disk",
    "ON_DISK_VERBS",
    "verb",
    "wakes_on_activity",
]

# The values of vms.models.VMState (a test keeps the two equal).
ALL_STATES = frozenset(
    {
        "creating",
        "starting",
        "running",
        "stopping",
        "stopped",
        "pausing",
        "paused",
        "resuming",
        "rebooting",
        "resizing",
        "snapshotting",
        "restoring",
        "destroying",
        "destroyed",
        "failed",
        "crashed",
    }
)
# A destroyed VM's state: its row stays for the record; live lists and sessions leave it out.
GONE = "destroyed"
# The states in which a VM holds its host's vCPUs and memory (vms.capacity): its VMM runs or is
# being brought up or torn down. A stopped, crashed or destroyed VM holds none; a failed one may
# still have its VMM (a failed stop), so it counts until settled.
HOLDS_HOST = ALL_STATES - frozenset({"creating", "stopped", "crashed", "destroyed"})
# ... and of those, the states in which a VM not placed on a host yet (no VMM has run for it)
# holds what it asked for: a failed first start left nothing running.
HOLDS_UNPLACED = HOLDS_HOST - frozenset({"failed"})
# The states in which the pressure loop may balloon a VM or give its memory back (vms.pressure):
# its guest runs, so its balloon driver answers.
BALLOONABLE = frozenset({"running"})
# The events besides the verbs' outcomes that set a VM's state (the projector's, vms.projectors):
# a new VM is stopped until its first start; the reconciler found its VMM dead.
EVENT_STATES: dict[str, str] = {"vm.created": "stopped", "vm.crashed": "crashed"}
_SETTLED_OR_BROKEN = frozenset({"running", "paused", "stopped", "failed", "crashed"})
# The states of a VM whose VMM failed or died: what a fork's progress counts as failed (vms.forks).
BROKEN = frozenset({"failed", "crashed"})

# How a verb is carried out:
#   request: the command appends the request, the worker carries it out and appends the outcome;
#   guest:   the web tier appends the request (committed), asks the guest agent, appends the
#            outcome (vms.guest): the VM's state does not move;
#   record:  the event is the change itself, appended by the command (a new VM, a deleted
#            snapshot, a console session).
Kind = Literal["request", "guest", "record"]
# What the reconciler does with a request whose worker died half-way (vms.reconcile):
#   guest_up: succeeded if the guest answers, else failed (the VMM is torn down);
#   finish:   the VMM is torn down, which is what was asked, and the request succeeded;
#   report:   failed, leaving the VM in the state its VMM is really in.
OnInterrupt = Literal["guest_up", "finish", "report"]


@dataclass(frozen=True)
class ApiRoute:
    """Where the REST API offers a verb: an action of the ``vms`` or ``snapshots`` viewset, or
    of a VM's ``ports`` or ``egress`` (``/vms/{id}/ports/``, ``/vms/{id}/egress/``; vms.api)
    (``create`` and ``destroy`` are the collection's POST and the item's DELETE)."""

    resource: Literal["vms", "snapshots", "ports", "egress"]
    action: str
    methods: tuple[str, ...] = ("post",)


@dataclass(frozen=True)
class Verb:
    name: str
    kind: Kind
    permission: str  # the Django permission (app_label.codename) the caller must hold
    description: str
    api: ApiRoute | None
    # What it acts on: a VM (owned), a snapshot (owned), or nothing yet (it creates a VM).
    target: Literal["vm", "snapshot", "new"] = "vm"
    also_requires: tuple[str, ...] = ()  # further permissions (clone: also restoring)
    allowed_from: frozenset[str] = frozenset()  # the VM states it may be asked in
    transitional: str | None = None  # the VM's state while it is carried out
    requested: str | None = None  # the request event type
    succeeded: str | None = None  # the outcome event type on success
    failed: str | None = None  # the outcome event type on failure
    settles_to: str | None = None  # the state a success leaves (its data["state"] overrides)
    fails_to: str | None = None  # the state a failure leaves (its data["state"] overrides)
    handler: str | None = None  # the function of vms.worker that carries it out
    on_interrupt: OnInterrupt | None = None
    launches_vmm: bool = False  # a VMM it launched must go if a destroy overtook it
    overtakes: bool = False  # may be asked while another request is pending (destroy)
    records: tuple[str, ...] = ()  # kind "record": the event types it appends
    # Kind "guest": the setting (seconds) bounding how long it may run; the reconciler settles
    # a request left without an outcome for longer (plus a margin) as failed, interrupted.
    time_limit: str | None = None
    # What its events evidence in the compliance reports (roles of audit.catalogue's
    # EVIDENCE_ROLES): a guest verb's request and outcomes, a request verb's outcomes, a record
    # verb's records. Every guest verb states one (guest access is always evidence).
    evidence: frozenset[str] = frozenset()

    @property
    def permissions(self) -> tuple[str, ...]:
        return (self.permission, *self.also_requires)

    def request_type(self) -> str:
        """The request event type of a request or guest verb (ValueError for others)."""
        if self.requested is None:
            raise ValueError(f"{self.name} appends no request")
        return self.requested

    def outcomes(self) -> tuple[str, str]:
        """(success, failure) event types of a request or guest verb (ValueError for others)."""
        if self.succeeded is None or self.failed is None:
            raise ValueError(f"{self.name} has no outcome events")
        return self.succeeded, self.failed

    def event_types(self) -> tuple[str, ...]:
        """The event types this verb appends (request and outcomes, or its records)."""
        return tuple(t for t in (self.requested, self.succeeded, self.failed) if t) + self.records


def _request(
    name: str,
    permission: str,
    *,
    allowed_from: frozenset[str],
    transitional: str,
    succeeded: str,
    settles_to: str,
    fails_to: str,
    on_interrupt: OnInterrupt,
    api: ApiRoute | None,
    launches_vmm: bool = False,
    overtakes: bool = False,
    evidence: frozenset[str] = frozenset(),
) -> Verb:
    return Verb(
        name=name,
        kind="request",
        permission=permission,
        description=f"A {name} of a VM was requested.",
        api=api,
        allowed_from=allowed_from,
        transitional=transitional,
        requested=f"vm.{name}_requested",
        succeeded=succeeded,
        failed=f"vm.{name}_failed",
        settles_to=settles_to,
        fails_to=fails_to,
        handler=f"do_{name}",
        on_interrupt=on_interrupt,
        launches_vmm=launches_vmm,
        overtakes=overtakes,
        evidence=evidence,
    )


def _guest(
    name: str, permission: str, *, succeeded: str, api: ApiRoute, time_limit: str, evidence: str
) -> Verb:
    return Verb(
        name=name,
        kind="guest",
        permission=permission,
        description=f"Guest access: {name.replace('_', ' ')}.",
        api=api,
        allowed_from=frozenset({"running"}),
        requested=f"vm.{name}_requested",
        succeeded=succeeded,
        failed=f"vm.{name}_failed",
        time_limit=time_limit,
        evidence=frozenset({evidence}),
    )


OPERATE = "vms.operate_vm"
_BACKUP = frozenset({"backup"})

VERBS: tuple[Verb, ...] = (
    # --- Requests on an existing VM: the worker carries them out -------------------------------
    _request(
        "start",
        OPERATE,
        allowed_from=frozenset({"stopped", "failed", "crashed"}),
        transitional="starting",
        succeeded="vm.started",
        settles_to="running",
        fails_to="failed",
        on_interrupt="guest_up",
        launches_vmm=True,
        api=ApiRoute("vms", "start"),
    ),
    _request(
        "stop",
        OPERATE,
        allowed_from=frozenset({"running", "paused", "failed", "crashed"}),
        transitional="stopping",
        succeeded="vm.stopped",
        settles_to="stopped",
        fails_to="running",
        on_interrupt="finish",
        api=ApiRoute("vms", "stop"),
    ),
    _request(
        "reboot",
        OPERATE,
        allowed_from=frozenset({"running"}),
        transitional="rebooting",
        succeeded="vm.rebooted",
        settles_to="running",
        fails_to="running",
        on_interrupt="guest_up",
        api=ApiRoute("vms", "reboot"),
    ),
    _request(
        "pause",
        OPERATE,
        allowed_from=frozenset({"running"}),
        transitional="pausing",
        succeeded="vm.paused",
        settles_to="paused",
        fails_to="running",
        on_interrupt="report",
        api=ApiRoute("vms", "pause"),
    ),
    _request(
        "resume",
        OPERATE,
        allowed_from=frozenset({"paused"}),
        transitional="resuming",
        succeeded="vm.resumed",
        settles_to="running",
        fails_to="paused",
        on_interrupt="guest_up",
        api=ApiRoute("vms", "resume"),
    ),
    _request(
        "resize",
        OPERATE,
        allowed_from=frozenset({"running", "stopped"}),
        transitional="resizing",
        succeeded="vm.resized",
        settles_to="running",
        fails_to="running",
        on_interrupt="report",
        api=ApiRoute("vms", "resize"),
    ),
    _request(
        "snapshot",
        "vms.snapshot_vm",
        allowed_from=frozenset({"running", "paused"}),
        transitional="snapshotting",
        succeeded="vm.snapshotted",
        settles_to="running",
        fails_to="running",
        on_interrupt="report",
        api=ApiRoute("vms", "snapshot"),
        evidence=_BACKUP,
    ),
    _request(
        "restore",
        "vms.rollback_snapshot",
        allowed_from=_SETTLED_OR_BROKEN,
        transitional="restoring",
        succeeded="vm.restored",
        settles_to="running",
        fails_to="failed",
        on_interrupt="guest_up",
        launches_vmm=True,
        api=ApiRoute("snapshots", "restore"),
        evidence=_BACKUP,
    ),
    _request(
        "destroy",
        "vms.delete_virtualmachine",
        allowed_from=ALL_STATES - {GONE},
        transitional="destroying",
        succeeded="vm.destroyed",
        settles_to=GONE,
        fails_to="failed",
        on_interrupt="finish",
        overtakes=True,
        api=ApiRoute("vms", "destroy", ("delete",)),
    ),
    # --- Guest access: the web tier asks the agent, between a committed request and its outcome
    _guest(
        "exec",
        "vms.exec_vm",
        succeeded="vm.exec_completed",
        api=ApiRoute("vms", "exec"),
        time_limit="SANDBOX_EXEC_MAX_TIMEOUT_S",
        evidence="guest_command",
    ),
    _guest(
        "file_upload",
        "vms.write_files",
        succeeded="vm.file_uploaded",
        api=ApiRoute("vms", "files", ("put", "post")),
        time_limit="SANDBOX_GUEST_TRANSFER_TIMEOUT_S",
        evidence="guest_transfer",
    ),
    _guest(
        "file_download",
        "vms.read_files",
        succeeded="vm.file_downloaded",
        api=ApiRoute("vms", "files", ("get",)),
        time_limit="SANDBOX_GUEST_TRANSFER_TIMEOUT_S",
        evidence="guest_transfer",
    ),
    # --- Recorded at once: the event is the change ---------------------------------------------
    Verb(
        name="create",
        kind="record",
        permission="vms.add_virtualmachine",
        description="A new VM from a template (and its first start, unless asked not to).",
        target="new",
        records=("vm.created",),
        api=ApiRoute("vms", "create"),
    ),
    Verb(
        name="clone",
        kind="record",
        permission="vms.add_virtualmachine",
        also_requires=("vms.rollback_snapshot",),
        description="A new VM, with its own identity, restored from a snapshot.",
        target="snapshot",
        records=("vm.created",),
        api=ApiRoute("snapshots", "clone"),
    ),
    Verb(
        name="fork",
        kind="record",
        permission="vms.add_virtualmachine",
        also_requires=("vms.snapshot_vm", "vms.rollback_snapshot"),
        description=(
            "N new VMs from a running VM's state of now: one snapshot of it (its ordinary "
            "snapshot request, data fork), then each new VM restored from it with its own "
            "identity (their restore requests, data fork_of)."
        ),
        records=("vm.created",),
        allowed_from=frozenset({"running"}),
        api=ApiRoute("vms", "fork"),
    ),
    Verb(
        name="delete_snapshot",
        kind="record",
        permission="vms.snapshot_vm",
        description="A snapshot's files go; its record stays.",
        target="snapshot",
        records=("snapshot.deleted",),
        api=ApiRoute("snapshots", "destroy", ("delete",)),
        evidence=_BACKUP,
    ),
    # The VM's NIC: its port forwards and its egress policy (vms.commands; the worker applies
    # them to the host's rules after the commit).
    Verb(
        name="add_port_forward",
        kind="record",
        permission=OPERATE,
        description="A host port forwarded to a port of the VM's guest.",
        records=("net.port_forward_added",),
        api=ApiRoute("ports", "create"),
    ),
    Verb(
        name="remove_port_forward",
        kind="record",
        permission=OPERATE,
        description="A port forward of the VM removed.",
        records=("net.port_forward_removed",),
        api=ApiRoute("ports", "destroy", ("delete",)),
    ),
    Verb(
        name="set_egress",
        kind="record",
        permission=OPERATE,
        description="The VM's egress policy (and allow list) changed.",
        records=("net.egress_policy_changed",),
        api=ApiRoute("egress", "update", ("put",)),
    ),
    # Its lifetime (vms.lifetimes): when its end comes, the system asks a stop or a destroy.
    Verb(
        name="set_lifetime",
        kind="record",
        permission=OPERATE,
        description="The VM's lifetime set, extended or cleared (seconds from now).",
        records=("vm.lifetime_set",),
        allowed_from=ALL_STATES - {GONE},
        api=ApiRoute("vms", "lifetime"),
    ),
    # Its idle policy (vms.idle): paused by the system when unused, resumed by the next use.
    Verb(
        name="set_idle",
        kind="record",
        permission=OPERATE,
        description="The VM's idle policy set or cleared (seconds without guest activity).",
        records=("vm.idle_policy_set",),
        allowed_from=ALL_STATES - {GONE},
        api=ApiRoute("vms", "idle"),
    ),
    # Its priority under host pressure and its opt-out (vms.pressure).
    Verb(
        name="set_priority",
        kind="record",
        permission=OPERATE,
        description="The VM's priority under host pressure (high, normal, low) or opt-out changed.",
        records=("vm.priority_set",),
        allowed_from=ALL_STATES - {GONE},
        api=ApiRoute("vms", "priority"),
    ),
    Verb(
        name="console",
        kind="record",
        permission="vms.console_vm",  # to type; watching needs only to see the VM
        description="A serial console session (recorded; referenced by its events).",
        records=("vm.console_opened", "vm.console_closed"),
        evidence=frozenset({"console_session"}),
        api=None,  # a websocket (vms.consumers), not a REST action
    ),
    Verb(
        name="share_preview",
        kind="record",
        permission="vms.operate_vm",
        description="A shareable, expiring link to a port of the guest (vms.previews).",
        records=("vm.preview_link_created",),
        evidence=frozenset({"preview_link"}),
        allowed_from=frozenset({"running"}),  # a preview reaches a running guest (preview_access)
        api=None,  # POST /api/v1/vms/{id}/previews/ (vms.preview_api), with its own input
    ),
    Verb(
        name="revoke_preview",
        kind="record",
        permission="vms.operate_vm",
        description="Shareable preview links of the VM revoked (one, or all still open).",
        records=("vm.preview_link_revoked",),
        evidence=frozenset({"preview_link"}),
        api=None,  # DELETE /api/v1/vms/{id}/previews/[{link_id}/] (vms.preview_api)
    ),
)

REQUEST_VERBS = tuple(v for v in VERBS if v.kind == "request")
GUEST_VERBS = tuple(v for v in VERBS if v.kind == "guest")
RECORD_VERBS = tuple(v for v in VERBS if v.kind == "record")

_BY_NAME = {v.name: v for v in VERBS}
_BY_REQUEST = {v.requested: v for v in VERBS if v.requested}


def verb(name: str) -> Verb:
    """The row of ``name`` (KeyError for a verb the table does not have)."""
    return _BY_NAME[name]


def request_verb(name: str) -> Verb:
    """The row of a verb the worker carries out (KeyError otherwise)."""
    row = _BY_NAME[name]
    if row.kind != "request":
        raise KeyError(name)
    return row


def guest_verb(name: str) -> Verb:
    row = _BY_NAME[name]
    if row.kind != "guest":
        raise KeyError(name)
    return row


def by_request(event_type: str) -> Verb | None:
    """The verb whose request event type is ``event_type``, if any."""
    return _BY_REQUEST.get(event_type)


def outcome_states() -> dict[str, str]:
    """Outcome event type -> the state it leaves the VM in (unless its data says otherwise)."""
    out: dict[str, str] = {}
    for v in REQUEST_VERBS:
        succeeded, failed = v.outcomes()
        assert v.settles_to and v.fails_to
        out[succeeded] = v.settles_to
        out[failed] = v.fails_to
    return out


def wakes_on_activity(state: str, idle_paused: bool) -> bool:
    """A VM the system paused for idleness (vms.idle) in a state its resume may be asked from:
    the next exec or file request resumes it first. One its owner paused is not (409)."""
    return idle_paused and state in _BY_NAME["resume"].allowed_from


# The verbs a VM suspended to disk (paused with no VMM, its state in a file: vms.idle) may be
# asked: the others need its VMM. A resume restores it from the file; a stop or a restore drops
# the file; a destroy removes it with the VM's data.
ON_DISK_VERBS = frozenset({"resume", "stop", "restore", "destroy"})


def may_while_on_disk(verb: str) -> bool:
    """May ``verb`` be asked of a VM suspended to disk?"""
    return verb in ON_DISK_VERBS


def stays_on_disk(state: str) -> bool:
    """May a VM suspended to disk still be so once an outcome left it in ``state``? Only while
    it is paused (the pause's state): any other outcome (resumed, stopped, restored, failed)
    ends it."""
    return state == _BY_NAME["pause"].settles_to


def may_idle(state: str) -> bool:
    """A VM in a state the idle policy's pause may be asked from (running)."""
    return state in _BY_NAME["pause"].allowed_from


# --- The VM part of the event catalogue -------------------------------------------------------


# Events of the VM and snapshot aggregates that no verb appends as its request or outcome.
OTHER_EVENTS: tuple[EventType, ...] = (
    # Catalogued for logs that have it; a create is recorded as vm.created.
    EventType(
        "vm.create_requested",
        "vm",
        1,
        "change",
        "A create of a VM was requested.",
        not_appended="a create is recorded as vm.created (then vm.start_requested)",
    ),
    EventType(
        "vm.progress",
        "vm",
        1,
        "operations",
        "A step of a long VM operation (booting, snapshotting).",
        not_evidence="a step of an operation, not an outcome",
    ),
    EventType(
        "vm.crashed",
        "vm",
        1,
        "monitoring",
        "The reconciler found the VM's VMM dead.",
        evidence=frozenset({"crash"}),
    ),
    # Host pressure (vms.pressure): what the control loop did to a VM and the readings that made
    # it. The VM's state does not move (a ballooned VM is still running).
    EventType(
        "vm.ballooned",
        "vm",
        1,
        "monitoring",
        "Under host pressure the VM's balloon took memory back (action, reason, the readings and "
        "thresholds that caused it, before_mib, target_mib).",
        not_evidence="a resource adjustment by the host, not an access or a change of the VM",
    ),
    EventType(
        "vm.balloon_released",
        "vm",
        1,
        "monitoring",
        "The host's pressure passed (or the VM opted out) and its balloon gave the memory back "
        "(reason, readings, before_mib, target_mib).",
        not_evidence="a resource adjustment by the host, not an access or a change of the VM",
    ),
    EventType(
        "vm.cpu_lowered",
        "vm",
        1,
        "monitoring",
        "Under host CPU pressure the CPU weight of the VM's VMM cgroup was lowered (action, "
        "reason, the readings and thresholds that caused it, before, weight).",
        not_evidence="a resource adjustment by the host, not an access or a change of the VM",
    ),
    EventType(
        "vm.cpu_restored",
        "vm",
        1,
        "monitoring",
        "The host's CPU pressure passed (or the VM opted out) and the VM's CPU weight was set "
        "back to its own (reason, readings, before, weight).",
        not_evidence="a resource adjustment by the host, not an access or a change of the VM",
    ),
    EventType(
        "vm.recovered",
        "vm",
        1,
        "monitoring",
        "The reconciler brought a VM record back in line.",
        not_appended="the reconciler settles a live VM's interrupted request with its outcome",
    ),
    EventType(
        "vm.agent_credential_rotated",
        "vm",
        1,
        "access",
        "The VM's guest agent got a new credential (reason: enrolled, restored, cloned, "
        "requested, handed_out: a warm pool member given to its VM); the old one is refused "
        "from then on. Never the value.",
        not_evidence="a credential of the host's own channel to the guest changed; "
        "who may reach the guest did not",
    ),
    EventType(
        "snapshot.created",
        "snapshot",
        1,
        "data",
        "A snapshot was taken (files and SHA-256 manifest).",
        evidence=_BACKUP,
    ),
    EventType(
        "snapshot.verified",
        "snapshot",
        1,
        "data",
        "A snapshot's manifest was checked before use.",
        not_appended="a snapshot's manifest check records only a failure (snapshot.corrupted)",
    ),
    EventType(
        "snapshot.corrupted",
        "snapshot",
        1,
        "data",
        "A snapshot failed its manifest check.",
        evidence=frozenset({"backup", "integrity_check"}),
    ),
    EventType("net.ip_leased", "vm", 1, "change", "An address was leased to a VM."),
    EventType("net.ip_released", "vm", 1, "change", "A VM's address was released."),
    EventType("net.port_forward_added", "vm", 1, "change", "A host port was forwarded to a VM."),
    EventType("net.port_forward_removed", "vm", 1, "change", "A port forward was removed."),
    EventType(
        "net.egress_refused",
        "vm",
        1,
        "monitoring",
        "Connections the VM's egress policy refused in a period (destinations and counts).",
        evidence=frozenset({"egress_evidence"}),
    ),
    EventType(
        "net.dns_lookups",
        "vm",
        1,
        "monitoring",
        "Names the VM's resolver answered or refused in a period (counts per name).",
        evidence=frozenset({"egress_evidence"}),
    ),
)

# The networks VMs attach to (aggregate "network"; admins change them: vms.commands).
NETWORK_EVENTS: tuple[EventType, ...] = (
    EventType("net.network_created", "network", 1, "change", "A network was defined."),
    EventType("net.network_updated", "network", 1, "change", "A network's settings changed."),
    EventType("net.network_deleted", "network", 1, "change", "A network was deleted."),
)

# Warm pools (aggregate "pool": a member's id, the id of the VM it becomes; "target:<template>"
# for a template's target; vms.pools).
POOL_EVENTS: tuple[EventType, ...] = (
    EventType(
        "pool.vm_warming",
        "pool",
        1,
        "operations",
        "A pool member is being restored from its template's saved state (template, host, "
        "shape): it counts against the pool budget from now.",
        not_evidence="a VM of no user's being prepared; its hand-out is recorded as vm.created",
    ),
    EventType(
        "pool.vm_warmed",
        "pool",
        1,
        "operations",
        "A pool member is ready to be handed out (seconds, paused, image, pool size after).",
        not_evidence="a VM of no user's being prepared; its hand-out is recorded as vm.created",
    ),
    EventType(
        "pool.vm_handed_out",
        "pool",
        1,
        "operations",
        "A pool member was handed out to a create (the VM's id, owner and name; pool size "
        "after); it never returns to a pool.",
        not_evidence="the VM it became is recorded by vm.created and vm.started",
    ),
    EventType(
        "pool.vm_evicted",
        "pool",
        1,
        "operations",
        "A pool member was removed (reason: target lowered, stale image, template disabled, "
        "failed warm or hand-out, budget); its VMM goes.",
        not_evidence="a VM of no user's removed before anyone used it",
    ),
    EventType(
        "pool.target_set",
        "pool",
        1,
        "change",
        "An administrator set a template's warm pool target (template, target, before).",
        not_evidence="a capacity setting, not access to any user's data",
    ),
)

# Descriptions and categories of the event types the verbs append (categories are part of what
# reports count: keep them).
_GUEST_TEXT = {
    "vm.exec_requested": (
        "A command was asked for in the guest (argv, cwd, env names, timeout), before it ran."
    ),
    "vm.exec_completed": "A command ran in the guest (argv, exit, output hashes).",
    "vm.exec_failed": (
        "A requested command got no result from the guest (agent timeout, refusal, unreachable)."
    ),
    "vm.file_upload_requested": "A file upload into the guest was asked for (path).",
    "vm.file_uploaded": "A file was written into the guest (path, size, SHA-256).",
    "vm.file_upload_failed": "A requested upload into the guest failed.",
    "vm.file_download_requested": "A file download from the guest was asked for.",
    "vm.file_downloaded": "A file was read from the guest (path, size, SHA-256).",
    "vm.file_download_failed": "A requested download from the guest failed.",
}
_RECORD_TYPES = {
    "vm.created": ("vm", "change", "A VM was defined (spec, owner, template, identity)."),
    "vm.console_opened": ("vm", "access", "A console session started (recording referenced)."),
    "vm.console_closed": ("vm", "access", "A console session ended (recording, size, SHA-256)."),
    "vm.preview_link_created": (
        "vm",
        "access",
        "A shareable preview link to a guest's port was made (link id, port, expiry).",
    ),
    "vm.preview_link_revoked": (
        "vm",
        "access",
        "Shareable preview links were revoked before their expiry (link ids).",
    ),
    "vm.lifetime_set": (
        "vm",
        "change",
        "A VM's lifetime was set, extended or cleared (timeout_s from then, expires_at, on_expiry: "
        "stop or destroy); its end is a stop or destroy request with reason lifetime.",
    ),
    "vm.idle_policy_set": (
        "vm",
        "change",
        "A VM's idle policy was set or cleared (idle_timeout_s: seconds without exec, file "
        "transfer or console input before the system pauses it, reason idle; null: never; "
        "idle_to_disk: that pause suspends it to disk, its memory freed).",
    ),
    "vm.priority_set": (
        "vm",
        "change",
        "A VM's priority under host pressure or its opt-out changed (priority, pressure_opt_out, "
        "and what they were).",
    ),
    "snapshot.deleted": ("snapshot", "data", "A snapshot was deleted (by a user or retention)."),
    "net.port_forward_added": ("vm", "change", "A host port was forwarded to a VM."),
    "net.port_forward_removed": ("vm", "change", "A port forward was removed."),
    "net.egress_policy_changed": (
        "vm",
        "change",
        "A VM's egress policy changed (policy and allow list).",
    ),
}


def _verb_event_types(verbs: tuple[Verb, ...]) -> Iterator[EventType]:
    for v in verbs:
        if v.kind == "request":
            yield EventType(v.request_type(), "vm", 1, "change", v.description)
            for outcome in v.outcomes():
                text = f"Worker outcome of a {v.name} request."
                yield EventType(outcome, "vm", 1, "change", text, evidence=v.evidence)
        elif v.kind == "guest":
            if not v.evidence:
                raise ValueError(f"guest verb {v.name} states no compliance evidence role")
            for name in v.event_types():
                yield EventType(name, "vm", 1, "data", _GUEST_TEXT[name], evidence=v.evidence)
        else:
            for name in v.records:
                aggregate, category, text = _RECORD_TYPES[name]
                yield EventType(name, aggregate, 1, category, text, evidence=v.evidence)


def event_types(verbs: tuple[Verb, ...] = VERBS) -> tuple[EventType, ...]:
    """Every event type of the VM domain: the verbs' of ``verbs`` (the table) and the others
    (no name twice)."""
    seen: dict[str, EventType] = {}
    for t in (*_verb_event_types(verbs), *OTHER_EVENTS, *NETWORK_EVENTS, *POOL_EVENTS):
        if t.name in seen and seen[t.name] != t:
            raise ValueError(f"{t.name} is defined twice, differently")
        seen[t.name] = t
    return tuple(seen.values())


catalogue.register(*event_types())
