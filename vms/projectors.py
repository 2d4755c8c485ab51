"""Inline projection of vm.*, snapshot.* and net.* events into the VM read models.

A request event puts the VM into a transitional state and records the request as pending; the
worker's outcome event (caused by that request) settles the state, clears the pending request
and writes a ``RequestOutcome`` row whose primary key is the request's event id, so a second
outcome for one request (a retried task) fails to append. The states are the lifecycle table's
(``vms.lifecycle``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from django.db.models import F

from audit import catalogue
from audit.projections import Projector, load_rows, register, update_rows
from audit.store import RecordedEvent
from vms import lifecycle
from vms.models import (
    Network,
    PoolMember,
    PoolTarget,
    PortForward,
    PreviewLink,
    RequestOutcome,
    Snapshot,
    Task,
    Usage,
    VirtualMachine,
)

# The states of the lifecycle table (vms.lifecycle): request type -> transitional state, and
# outcome type -> resulting state (``data["state"]`` overrides: a failed pause leaves it running).
REQUESTED: dict[str, str] = {
    v.requested: v.transitional for v in lifecycle.REQUEST_VERBS if v.requested and v.transitional
}
OUTCOMES: dict[str, str] = lifecycle.outcome_states()
FAILURES = frozenset(v.failed for v in lifecycle.REQUEST_VERBS if v.failed)
# Guest access requests and their outcomes (exec, file transfers): folded into nothing but the
# VM's version, except an exec request that gives the guest secrets (``secrets_seen``).
VERSION_ONLY = frozenset(
    t for v in lifecycle.GUEST_VERBS for t in (v.requested, v.succeeded, v.failed) if t
)


def _version_only(e: RecordedEvent) -> bool:
    return e.type in VERSION_ONLY and not (e.type == "vm.exec_requested" and e.data.get("secrets"))


def _usage_delta(usage: dict[int, dict[str, int]], user_id: int, **delta: int) -> None:
    row = usage.setdefault(user_id, {})
    for key, value in delta.items():
        row[key] = row.get(key, 0) + value


def _seen(seen: list[dict[str, str]], given: list[dict[str, Any]]) -> list[dict[str, str]]:
    """``seen`` with the secrets of ``given`` (name and owner) added once each."""
    out = list(seen)
    for g in given:
        entry = {"name": g["name"], "owner": g["owner"]}
        if entry not in out:
            out.append(entry)
    return out


@register
class VMProjector(Projector):
    name = "vms.state"
    # Every event of the vm, snapshot and network aggregates: even those folded into nothing
    # (exec, file transfers) move the aggregate's version, which commands check.
    event_types = frozenset(
        t.name for t in catalogue.all_types() if t.aggregate_type in ("vm", "snapshot", "network")
    )
    inline = True

    def handle(self, events: Sequence[RecordedEvent]) -> None:
        if all(_version_only(e) for e in events):
            # An exec's or a transfer's events (most appends of a busy VM): its row is not read,
            # only its version and time written.
            last = {e.aggregate_id: e for e in events}
            update_rows(
                VirtualMachine,
                [
                    VirtualMachine(
                        id=uuid.UUID(e.aggregate_id), version=e.version, updated_at=e.recorded_at
                    )
                    for e in last.values()
                ],
                ["version", "updated_at"],
            )
            return
        vm_ids = {uuid.UUID(e.aggregate_id) for e in events if e.aggregate_type == "vm"}
        snap_ids = {uuid.UUID(e.aggregate_id) for e in events if e.aggregate_type == "snapshot"}
        snap_ids |= {
            uuid.UUID(e.data["snapshot_id"])
            for e in events
            if e.type in ("vm.snapshot_requested", "vm.snapshotted", "vm.snapshot_failed")
            and e.data.get("snapshot_id")
        }
        # A VM created in this batch has no row yet (vm.created is its first event): don't ask.
        born = {uuid.UUID(e.aggregate_id) for e in events if e.type == "vm.created"}
        vms = load_rows(VirtualMachine, vm_ids - born)
        snaps = load_rows(Snapshot, snap_ids)
        new_vms: dict[uuid.UUID, VirtualMachine] = {}
        new_snaps: dict[uuid.UUID, Snapshot] = {}
        outcomes: list[RequestOutcome] = []
        usage: dict[int, dict[str, int]] = {}

        net_ids = {uuid.UUID(e.aggregate_id) for e in events if e.aggregate_type == "network"}
        networks = load_rows(
            Network,
            net_ids
            - {uuid.UUID(e.aggregate_id) for e in events if e.type == "net.network_created"},
        )
        new_networks: dict[uuid.UUID, Network] = {}
        gone_networks: set[uuid.UUID] = set()
        new_forwards: dict[uuid.UUID, PortForward] = {}
        gone_forwards: set[uuid.UUID] = set()

        for e in events:
            data = e.data
            at = e.recorded_at
            if e.aggregate_type == "network":
                self._network_event(e, networks, new_networks, gone_networks)
                continue
            if e.aggregate_type == "snapshot":
                snap = snaps.get(uuid.UUID(e.aggregate_id))
                if snap is None:
                    continue
                self._snapshot_event(e, data, snap, usage)
                continue
            vm_id = uuid.UUID(e.aggregate_id)
            if e.type == "vm.created":
                vm = VirtualMachine(
                    id=vm_id,
                    name=data["name"],
                    owner_id=data["owner_id"],
                    template=data["template"],
                    boot=data["boot"],
                    image=data.get("image", "linux"),
                    vcpus=data["vcpus"],
                    memory_mib=data["memory_mib"],
                    disk_mib=data["disk_mib"],
                    state=lifecycle.EVENT_STATES[e.type],
                    hostname=data["hostname"],
                    mac=data["mac"],
                    ip=data.get("ip"),
                    network_id=data.get("network_id"),
                    tap=data.get("tap", ""),
                    egress=data.get("egress", "none"),
                    source_snapshot_id=data.get("source_snapshot_id"),
                    last_snapshot_id=data.get("source_snapshot_id"),
                    secrets=list(data.get("secrets", [])),
                    secrets_seen=_seen([], data.get("secrets_seen", data.get("secrets", []))),
                    budget_group_id=data.get("budget_group_id"),
                    on_expiry=data.get("on_expiry", "stop"),
                    idle_timeout_s=data.get("idle_timeout_s"),
                    idle_to_disk=bool(data.get("idle_to_disk", False)),
                    priority=data.get("priority", "normal"),
                    pressure_opt_out=bool(data.get("pressure_opt_out", False)),
                    created_at=at,
                    updated_at=at,
                    state_changed_at=at,
                    version=e.version,
                )
                vms[vm_id] = new_vms[vm_id] = vm
                _usage_delta(
                    usage,
                    vm.owner_id,
                    vms=1,
                    vcpus=vm.vcpus,
                    memory_mib=vm.memory_mib,
                    disk_mib=vm.disk_mib,
                )
                continue
            found = vms.get(vm_id)
            if found is None:  # events of a VM whose creation predates this projection's reset
                continue
            vm = found
            vm.version = e.version
            vm.updated_at = at
            if e.type in REQUESTED:
                self._set_state(vm, REQUESTED[e.type], at)
                vm.pending_request = e.event_id
                vm.pending_type = e.type
                vm.last_error = ""
                vm.progress = {}
                if data.get("reason") == "lifetime":
                    vm.expires_at = None  # its end asked for: asked once (vms.lifetimes)
                if e.type == "vm.pause_requested":
                    # The system's pause for idleness: the next guest request resumes it.
                    vm.idle_paused = data.get("reason") == "idle"
                elif e.type != "vm.snapshot_requested":  # a snapshot leaves it as it was
                    vm.idle_paused = False
                if e.type == "vm.snapshot_requested":
                    snap = Snapshot(
                        id=uuid.UUID(data["snapshot_id"]),
                        name=data["name"],
                        vm_id=vm_id,
                        vm_name=vm.name,
                        owner_id=vm.owner_id,
                        parent_id=data.get("parent_id"),
                        state=Snapshot.State.CREATING,
                        template=vm.template,
                        boot=vm.boot,
                        image=vm.image,
                        vcpus=vm.vcpus,
                        memory_mib=vm.memory_mib,
                        disk_mib=vm.disk_mib,
                        created_at=at,
                    )
                    snaps[snap.id] = new_snaps[snap.id] = snap
                    _usage_delta(usage, vm.owner_id, snapshots=1)
            elif e.type in OUTCOMES:
                if e.causation_id:
                    outcomes.append(
                        RequestOutcome(
                            request_event_id=e.causation_id,
                            outcome_event_id=e.event_id,
                            outcome_type=e.type,
                            position=e.position,
                        )
                    )
                if e.type == "vm.snapshot_failed" and data.get("snapshot_id"):
                    snap = snaps.get(uuid.UUID(data["snapshot_id"]))
                    if snap is not None and snap.state == Snapshot.State.CREATING:
                        snap.state = Snapshot.State.FAILED
                        snap.last_error = str(data.get("reason", ""))[:2000]
                        _usage_delta(usage, vm.owner_id, snapshots=-1)
                if e.causation_id and vm.pending_request != e.causation_id:
                    # The outcome of a request a later one overtook (a destroy): the VM's state,
                    # shape and usage are that later request's to settle, never this one's.
                    continue
                state = data.get("state") or OUTCOMES[e.type]
                self._set_state(vm, state, at)
                vm.pending_request = vm.pending_type = ""
                vm.progress = {}
                if e.type in FAILURES:
                    vm.last_error = str(data.get("reason", "failed"))[:2000]
                    if data.get("lifetime_retry_at"):
                        # A lifetime's stop or destroy that failed: asked again then.
                        vm.expires_at = datetime.fromisoformat(data["lifetime_retry_at"])
                if e.type == "vm.paused":
                    # Suspended to disk (vms.idle): no VMM, its state in a file.
                    vm.suspended_to_disk = bool(data.get("to_disk"))
                elif not lifecycle.stays_on_disk(state):
                    vm.suspended_to_disk = False
                if e.type in ("vm.started", "vm.restored"):
                    # A new VMM: its image is what the outcome says, unknown ("") if it says
                    # nothing, never the image of the VMM before it; its balloon is deflated
                    # and its cgroup has the VM's own CPU weight (a restore gives a guest saved
                    # while ballooned all its memory back: vms.worker.do_restore), whatever
                    # the pressure loop had done to the VMM before it.
                    vm.image_id = data.get("image_id", "")
                    vm.balloon_target_mib = vm.ballooned_at = None
                    vm.cpu_weight = vm.cpu_lowered_at = None
                if e.type == "vm.started":
                    vm.host = data.get("host", vm.host)
                    vm.hypervisor = data.get("hypervisor", vm.hypervisor)
                elif e.type == "vm.resized":
                    _usage_delta(
                        usage,
                        vm.owner_id,
                        vcpus=data["vcpus"] - vm.vcpus,
                        memory_mib=data["memory_mib"] - vm.memory_mib,
                    )
                    vm.vcpus, vm.memory_mib = data["vcpus"], data["memory_mib"]
                elif e.type in ("vm.snapshotted", "vm.restored") and data.get("snapshot_id"):
                    vm.last_snapshot_id = uuid.UUID(data["snapshot_id"])
                elif e.type == "vm.destroyed":
                    _usage_delta(
                        usage,
                        vm.owner_id,
                        vms=-1,
                        vcpus=-vm.vcpus,
                        memory_mib=-vm.memory_mib,
                        disk_mib=-vm.disk_mib,
                    )
                    vm.ip = None
                    vm.expires_at = None  # a destroyed VM's lifetime has nothing left to end
            elif e.type == "vm.priority_set":
                vm.priority = data["priority"]
                vm.pressure_opt_out = bool(data["pressure_opt_out"])
            elif e.type == "vm.ballooned":
                vm.balloon_target_mib = data["target_mib"]
                vm.ballooned_at = at
            elif e.type == "vm.balloon_released":
                vm.balloon_target_mib = vm.ballooned_at = None
            elif e.type == "vm.cpu_lowered":
                vm.cpu_weight = data["weight"]
                vm.cpu_lowered_at = at
            elif e.type == "vm.cpu_restored":
                vm.cpu_weight = vm.cpu_lowered_at = None
            elif e.type == "vm.lifetime_set":
                ends = data.get("expires_at")
                vm.expires_at = datetime.fromisoformat(ends) if ends else None
                vm.on_expiry = data.get("on_expiry", vm.on_expiry)
            elif e.type == "vm.idle_policy_set":
                vm.idle_timeout_s = data.get("idle_timeout_s")
                vm.idle_to_disk = bool(data.get("idle_to_disk", False))
            elif e.type == "vm.exec_requested" and data.get("secrets"):
                vm.secrets_seen = _seen(vm.secrets_seen, data["secrets"])
            elif e.type == "vm.progress":
                vm.progress = {k: data[k] for k in ("step", "pct", "message") if k in data}
            elif e.type == "vm.crashed":
                self._set_state(vm, lifecycle.EVENT_STATES[e.type], at)
                vm.suspended_to_disk = False
                vm.pending_request = vm.pending_type = ""
                vm.last_error = str(data.get("reason", "the VMM died"))[:2000]
            elif e.type == "vm.recovered":
                self._set_state(vm, data["state"], at)
                vm.pending_request = vm.pending_type = ""
                if data.get("reason"):
                    vm.last_error = str(data["reason"])[:2000]
            elif e.type == "net.ip_leased":
                vm.ip = data["ip"]
                vm.network_id = data.get("network_id", vm.network_id)
            elif e.type == "net.ip_released":
                vm.ip = None
            elif e.type == "net.port_forward_added":
                forward = PortForward(
                    id=uuid.UUID(data["forward_id"]),
                    vm_id=vm_id,
                    protocol=data["protocol"],
                    guest_port=data["guest_port"],
                    host_port=data["host_port"],
                    created_at=at,
                )
                new_forwards[forward.id] = forward
            elif e.type == "net.port_forward_removed":
                forward_id = uuid.UUID(data["forward_id"])
                if new_forwards.pop(forward_id, None) is None:
                    gone_forwards.add(forward_id)
            elif e.type == "net.egress_policy_changed":
                vm.egress = data["egress"]
                vm.egress_allow = list(data.get("allow", []))

        kept = [n for nid, n in networks.items() if nid not in new_networks]
        # The default flag moves: the network that loses it is written first (one default).
        kept = sorted((n for n in kept if n.pk not in gone_networks), key=lambda n: n.is_default)
        if kept:
            update_rows(
                Network,
                kept,
                [
                    "name",
                    "subnet",
                    "gateway",
                    "bridge",
                    "isolated",
                    "port_min",
                    "port_max",
                    "default_egress",
                    "is_default",
                    "version",
                ],
            )
        Network.objects.bulk_create(list(new_networks.values()))
        VirtualMachine.objects.bulk_create(list(new_vms.values()))
        changed = [vm for vm_id, vm in vms.items() if vm_id not in new_vms]
        if changed:
            update_rows(
                VirtualMachine,
                changed,
                [
                    "state",
                    "pending_request",
                    "pending_type",
                    "host",
                    "hypervisor",
                    "image_id",
                    "vcpus",
                    "memory_mib",
                    "ip",
                    "network",
                    "egress",
                    "egress_allow",
                    "last_error",
                    "progress",
                    "last_snapshot",
                    "secrets_seen",
                    "expires_at",
                    "on_expiry",
                    "idle_timeout_s",
                    "idle_paused",
                    "idle_to_disk",
                    "suspended_to_disk",
                    "priority",
                    "pressure_opt_out",
                    "balloon_target_mib",
                    "ballooned_at",
                    "cpu_weight",
                    "cpu_lowered_at",
                    "version",
                    "updated_at",
                    "state_changed_at",
                ],
            )
        Snapshot.objects.bulk_create(list(new_snaps.values()))
        old_snaps = [s for sid, s in snaps.items() if sid not in new_snaps]
        if old_snaps:
            update_rows(
                Snapshot,
                old_snaps,
                [
                    "state",
                    "size_bytes",
                    "manifest",
                    "image_id",
                    "last_error",
                    "version",
                    "deleted_at",
                ],
            )
        RequestOutcome.objects.bulk_create(outcomes)
        self._apply_usage(usage)
        # Removed forwards first: a host port freed and taken again in one batch (a rebuild).
        if gone_forwards:
            PortForward.objects.filter(pk__in=gone_forwards).delete()
        PortForward.objects.bulk_create(list(new_forwards.values()))
        if gone_networks:
            # Only destroyed VMs may still name a deleted network (the command checks).
            VirtualMachine.objects.filter(network_id__in=gone_networks).update(network=None)
            Network.objects.filter(pk__in=gone_networks).delete()

    @staticmethod
    def _network_event(
        e: RecordedEvent,
        networks: dict[uuid.UUID, Network],
        new_networks: dict[uuid.UUID, Network],
        gone: set[uuid.UUID],
    ) -> None:
        network_id = uuid.UUID(e.aggregate_id)
        data = e.data
        if e.type == "net.network_created":
            network = Network(
                id=network_id,
                name=data["name"],
                subnet=data["subnet"],
                gateway=data["gateway"],
                bridge=data["bridge"],
                isolated=data["isolated"],
                port_min=data["port_min"],
                port_max=data["port_max"],
                default_egress=data["default_egress"],
                is_default=data["is_default"],
                version=e.version,
                created_at=e.recorded_at,
            )
            networks[network_id] = new_networks[network_id] = network
            return
        found = networks.get(network_id)
        if found is None:
            return
        found.version = e.version
        if e.type == "net.network_updated":
            for key, value in data["changes"].items():
                setattr(found, key, value)
        elif e.type == "net.network_deleted":
            if new_networks.pop(network_id, None) is None:
                gone.add(network_id)
            networks.pop(network_id, None)

    @staticmethod
    def _set_state(vm: VirtualMachine, state: str, at: datetime) -> None:
        if vm.state != state:
            vm.state = state
            vm.state_changed_at = at
        if state not in lifecycle.HOLDS_HOST:
            # Its VMM is gone, and its balloon and cgroup with it: the next start has all.
            vm.balloon_target_mib = vm.ballooned_at = None
            vm.cpu_weight = vm.cpu_lowered_at = None

    @staticmethod
    def _snapshot_event(
        e: RecordedEvent, data: dict[str, Any], snap: Snapshot, usage: dict[int, dict[str, int]]
    ) -> None:
        snap.version = e.version
        if e.type == "snapshot.created":
            snap.state = Snapshot.State.READY
            snap.manifest = data["manifest"]
            snap.size_bytes = data["size_bytes"]
            snap.image_id = data.get("image_id", "")
        elif e.type == "snapshot.corrupted":
            snap.state = Snapshot.State.CORRUPTED
            snap.last_error = str(data.get("reason", ""))[:2000]
        elif e.type == "snapshot.deleted":
            if snap.state != Snapshot.State.DELETED:
                if snap.state in (
                    Snapshot.State.READY,
                    Snapshot.State.CORRUPTED,
                    Snapshot.State.CREATING,
                ):
                    _usage_delta(usage, snap.owner_id, snapshots=-1)
                snap.state = Snapshot.State.DELETED
                snap.deleted_at = e.recorded_at

    @staticmethod
    def _apply_usage(usage: dict[int, dict[str, int]]) -> None:
        # One UPDATE per user (usually one user per batch), relative to the stored counts;
        # a user's first VM or snapshot creates the row.
        for user_id, delta in usage.items():
            changes = {key: F(key) + value for key, value in delta.items() if value}
            if not changes:
                continue
            if not Usage.objects.filter(user_id=user_id).update(**changes):
                Usage.objects.create(user_id=user_id, **delta)

    def reset(self) -> None:
        PortForward.objects.all().delete()
        RequestOutcome.objects.all().delete()
        VirtualMachine.objects.update(source_snapshot=None, last_snapshot=None)
        Snapshot.objects.update(parent=None)
        Snapshot.objects.all().delete()
        VirtualMachine.objects.all().delete()
        Network.objects.all().delete()
        Usage.objects.all().delete()


@register
class PreviewLinkProjector(Projector):
    """Shareable preview links: made, and revoked (``vms.preview_access`` refuses a link whose
    row is missing or revoked)."""

    name = "vms.preview_links"
    event_types = frozenset({"vm.preview_link_created", "vm.preview_link_revoked"})
    inline = True

    def handle(self, events: Sequence[RecordedEvent]) -> None:
        made: dict[str, PreviewLink] = {}
        for e in events:
            data = e.data
            if e.type == "vm.preview_link_created":
                made[data["link_id"]] = PreviewLink(
                    link_id=data["link_id"],
                    vm_id=uuid.UUID(e.aggregate_id),
                    port=data["port"],
                    created_by=e.actor_name,
                    created_at=e.recorded_at,
                    expires_at=datetime.fromtimestamp(data["expires"], tz=UTC),
                )
            elif e.type == "vm.preview_link_revoked":
                ids = list(data["link_ids"])
                for link_id in ids:
                    if link_id in made:  # made and revoked in one batch
                        made[link_id].revoked_at = e.recorded_at
                        made[link_id].revoked_by = e.actor_name
                PreviewLink.objects.bulk_create(made.values())
                made.clear()
                PreviewLink.objects.filter(link_id__in=ids, revoked_at__isnull=True).update(
                    revoked_at=e.recorded_at, revoked_by=e.actor_name
                )
        if made:
            PreviewLink.objects.bulk_create(made.values())

    def reset(self) -> None:
        PreviewLink.objects.all().delete()


@register
class PoolProjector(Projector):
    """Warm pools (``vms.pools``): members warming and ready, and the targets set by admins. A
    member handed out or evicted leaves the read model (the VM it became is a VirtualMachine)."""

    name = "vms.pools"
    event_types = frozenset(t.name for t in lifecycle.POOL_EVENTS)
    inline = True

    def handle(self, events: Sequence[RecordedEvent]) -> None:
        for e in events:
            data = e.data
            if e.type == "pool.target_set":
                PoolTarget.objects.update_or_create(
                    template=data["template"],
                    defaults={
                        "target": data["target"],
                        "set_by": e.actor_name,
                        "set_at": e.recorded_at,
                    },
                )
                continue
            member_id = uuid.UUID(e.aggregate_id)
            if e.type == "pool.vm_warming":
                PoolMember.objects.create(
                    id=member_id,
                    template=data["template"],
                    host=data["host"],
                    state=PoolMember.State.WARMING,
                    vcpus=data["vcpus"],
                    memory_mib=data["memory_mib"],
                    disk_mib=data["disk_mib"],
                    image_id=data.get("image_id", ""),
                    created_at=e.recorded_at,
                )
            elif e.type == "pool.vm_warmed":
                PoolMember.objects.filter(pk=member_id).update(
                    state=PoolMember.State.READY,
                    paused=data.get("paused", True),
                    ready_at=e.recorded_at,
                )
            else:  # pool.vm_handed_out, pool.vm_evicted
                PoolMember.objects.filter(pk=member_id).delete()

    def reset(self) -> None:
        PoolMember.objects.all().delete()
        PoolTarget.objects.all().delete()


# The task log: request type -> verb, outcome type -> (verb kind, succeeded?).
TASK_REQUESTS = {v.requested: v for v in lifecycle.VERBS if v.requested and v.kind != "record"}
TASK_OUTCOMES: dict[str, bool] = {
    t: ok for v in TASK_REQUESTS.values() for t, ok in ((v.succeeded, True), (v.failed, False)) if t
}


@register
class TaskProjector(Projector):
    """The task log (``Task``): a row per request, its progress (``vm.progress``, which names
    its request), and its outcome (the event the request caused). A request-kind request (the
    worker's) that another one overtook before it ended is ``superseded``: at most one of them is
    pending on a VM at a time (``vms.lifecycle``), so a newer one means the older will not end."""

    name = "vms.tasks"
    event_types = frozenset(TASK_REQUESTS) | frozenset(TASK_OUTCOMES) | {"vm.progress"}
    inline = True

    def handle(self, events: Sequence[RecordedEvent]) -> None:
        made: dict[str, Task] = {}  # this batch's new rows, written once at the end
        for e in events:
            verb = TASK_REQUESTS.get(e.type)
            if verb is not None:
                if verb.kind == "request":
                    self._supersede(made, e)
                made[e.event_id] = Task(
                    request_event_id=e.event_id,
                    position=e.position,
                    version=e.position,
                    vm_id=uuid.UUID(e.aggregate_id),
                    verb=verb.name,
                    kind=verb.kind,
                    actor=e.actor_name[:150],
                    actor_type=e.actor_type,
                    actor_id=e.actor_id or "",
                    channel=e.channel or "",
                    requested_at=e.recorded_at,
                )
                continue
            data = e.data
            request_id = data.get("request") if e.type == "vm.progress" else e.causation_id
            if not request_id:
                continue
            if e.type == "vm.progress":
                pct = data.get("pct")
                changes: dict[str, Any] = {
                    "step": str(data.get("step", ""))[:64],
                    "pct": max(0, min(100, pct)) if isinstance(pct, int) else None,
                    "message": str(data.get("message", ""))[:200],
                }
            else:
                ok = TASK_OUTCOMES[e.type]
                error = data.get("error") or data.get("reason") or ""
                changes = {
                    "state": "succeeded" if ok else "failed",
                    "outcome_type": e.type,
                    "outcome_position": e.position,
                    "error": "" if ok else str(error)[:500],
                    "finished_at": e.recorded_at,
                }
                if ok:
                    changes["pct"] = 100
            changes["version"] = e.position
            row = made.get(str(request_id))
            if row is not None:
                for k, v in changes.items():
                    setattr(row, k, v)
            else:
                Task.objects.filter(request_event_id=str(request_id)).update(**changes)
        if made:
            Task.objects.bulk_create(made.values())

    @staticmethod
    def _supersede(made: dict[str, Task], e: RecordedEvent) -> None:
        vm_id = uuid.UUID(e.aggregate_id)
        done = {"state": "superseded", "finished_at": e.recorded_at, "version": e.position}
        for row in made.values():
            if row.vm_id == vm_id and row.kind == "request" and row.state == "pending":
                for k, v in done.items():
                    setattr(row, k, v)
        Task.objects.filter(vm_id=vm_id, kind="request", state="pending").update(**done)

    def reset(self) -> None:
        Task.objects.all().delete()
