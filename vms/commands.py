"""Every VM action: one function per verb of the lifecycle table (``vms.lifecycle``).

Each checks permission and ownership (``vms.policy``), state and quota against the projections
and appends the request event, in one transaction taken under the event store's append lock (so
concurrent requests are checked one after the other). The worker task that carries the request
out is enqueued on commit (``vms.enqueue``); it appends the outcome through ``record_outcome``.
Views, consumers and tasks never write VM events or read-model rows themselves.

A verb that takes no input needs no function of its own here: ``ask`` asks any verb of the
table; the verbs with input have theirs (``WITH_INPUT``), and ``perform`` picks.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import Sum
from django.utils import timezone

from accounts.caller import Caller
from audit import store
from audit.actor import Actor
from audit.errors import ConcurrencyError
from audit.models import Event
from core.compiled import CompiledQuery, cached
from secretstore import guests
from vms import (
    capacity,
    enqueue,
    forks,
    identity,
    images,
    lifecycle,
    netconfig,
    policy,
    previews,
    quotas,
    runtime,
)
from vms.models import (
    GroupBudget,
    Network,
    PoolMember,
    PoolTarget,
    PortForward,
    PreviewLink,
    Quota,
    RequestOutcome,
    Snapshot,
    Template,
    VirtualMachine,
    VMActivity,
)

__all__ = [
    "Accepted",
    "AlreadySettled",
    "Busy",
    "GUEST_ACCESS",
    "GUEST_OUTCOMES",
    "InvalidState",
    "NotFound",
    "RULES",
    "SUPERSEDED",
    "WITH_INPUT",
    "add_port_forward",
    "ask",
    "clone",
    "create",
    "create_network",
    "create_preview_link",
    "delete_network",
    "delete_snapshot",
    "destroy",
    "ensure_default_network",
    "expire_lifetime",
    "guest_request_in_flight",
    "mark_used",
    "pause_idle",
    "request_activity_resume",
    "set_idle",
    "validate_idle_timeout",
    "validate_idle_to_disk",
    "fork",
    "is_pending",
    "pause",
    "perform",
    "pool_memory_used",
    "pool_targets",
    "reboot",
    "record_handout",
    "record_pool_evicted",
    "record_pool_warmed",
    "record_pool_warming",
    "record_console_closed",
    "record_console_opened",
    "record_crashed",
    "record_net_evidence",
    "record_guest_outcome",
    "record_outcome",
    "record_outcome_if_pending",
    "record_pressure_action",
    "record_progress",
    "record_snapshot_corrupted",
    "record_snapshot_created",
    "remove_port_forward",
    "request_guest_access",
    "require_guest_access",
    "resize",
    "restore",
    "resume",
    "set_egress",
    "set_lifetime",
    "set_pool_target",
    "set_priority",
    "set_group_budget",
    "set_quota",
    "settle_interrupted_guest_request",
    "snapshot",
    "start",
    "stop",
    "update_network",
    "validate_timeout",
]

NAME_MAX = 63


class NotFound(Exception):
    """No such VM or snapshot, or not one the caller may see."""


class InvalidState(Exception):
    """The VM's state does not allow the action (409 with the current state)."""

    def __init__(self, vm: VirtualMachine, action: str, allowed: frozenset[str]) -> None:
        self.vm, self.action, self.allowed = vm, action, allowed
        super().__init__(
            f"cannot {action} a VM that is {vm.state} (allowed from: {', '.join(sorted(allowed))})"
        )


class SuspendedToDisk(InvalidState):
    """The VM is suspended to disk (no VMM): only a resume, stop, restore or destroy is taken."""

    def __init__(self, vm: VirtualMachine, action: str) -> None:
        self.vm, self.action, self.allowed = vm, action, frozenset()
        Exception.__init__(
            self,
            f"cannot {action}: the VM is suspended to disk (it has no VMM); resume it first",
        )


class Busy(InvalidState):
    def __init__(self, vm: VirtualMachine, action: str) -> None:
        self.vm, self.action, self.allowed = vm, action, frozenset()
        Exception.__init__(
            self, f"cannot {action}: the VM is busy with {vm.pending_type or vm.state}"
        )


@dataclass(frozen=True)
class Accepted:
    """A request that the log has taken; the worker will append its outcome."""

    vm_id: uuid.UUID
    request: store.RecordedEvent
    snapshot: Snapshot | None = None
    # A warm pool member was handed out to this create (``vms.pools``): the request is not
    # enqueued; the caller resumes the member (``vms.pools.finish_handout``).
    pooled: PoolMember | None = None
    hostname: str = ""  # the VM's, for a hand-out

    @cached_property
    def vm(self) -> VirtualMachine:
        """The VM as the projection has it, read when first asked for: after the command's
        transaction, so not while it holds the event store's lock."""
        return _fresh(self.vm_id)


# verb -> (permission, states it may be asked from): the worker's verbs of the lifecycle table.
RULES: dict[str, tuple[str, frozenset[str]]] = {
    v.name: (v.permission, v.allowed_from) for v in lifecycle.REQUEST_VERBS
}


def _fresh(vm_id: uuid.UUID) -> VirtualMachine:
    try:
        return VirtualMachine.objects.select_related("owner").get(pk=vm_id)
    except VirtualMachine.DoesNotExist:
        raise NotFound(f"no VM {vm_id}") from None


# --- Requests on an existing VM ---------------------------------------------------------------


def _request(
    caller: Caller,
    vm: VirtualMachine,
    verb: str,
    data: dict[str, Any] | None = None,
    *,
    read_under_lock: bool = False,
) -> tuple[uuid.UUID, store.RecordedEvent]:
    """Check and append ``vm.<verb>_requested``; the caller holds the transaction.

    ``read_under_lock``: the caller took the append lock and then read ``vm``, so it is the
    state another request left and need not be read again."""
    row = lifecycle.request_verb(verb)
    policy.require(caller, verb, vm.owner_id)
    store.lock()
    if not read_under_lock:
        vm = _fresh(vm.pk)  # re-read under the lock: the state another request left
    if vm.busy and not row.overtakes:
        raise Busy(vm, verb)
    if vm.state not in row.allowed_from:
        raise InvalidState(vm, verb, row.allowed_from)
    if vm.suspended_to_disk and not lifecycle.may_while_on_disk(verb):
        raise SuspendedToDisk(vm, verb)
    if (row.launches_vmm and vm.state not in lifecycle.HOLDS_HOST) or (
        verb == "resume" and vm.suspended_to_disk
    ):
        # A verb that launches the VMM of a VM that holds no host (a start, the resume of one
        # suspended to disk): it must fit.
        capacity.check_host(vm.host, vcpus=vm.vcpus, memory_mib=vm.memory_mib)
    event = store.append(
        "vm",
        str(vm.pk),
        row.request_type(),
        data or {},
        actor=caller.actor,
        expected_version=vm.version,
    )
    _enqueue_on_commit(event)
    return vm.pk, event


def _enqueue_on_commit(event: store.RecordedEvent) -> None:
    transaction.on_commit(lambda: enqueue.request(event.event_id))


@transaction.atomic
def ask(caller: Caller, vm: VirtualMachine, verb: str) -> Accepted:
    """Ask for ``verb``, a worker's verb of the lifecycle table that takes no input."""
    if verb in WITH_INPUT:
        raise TypeError(f"{verb} takes input: call commands.{verb}")
    return Accepted(*_request(caller, vm, verb))


def perform(caller: Caller, vm: VirtualMachine, verb: str, **params: Any) -> Accepted:
    """Ask for ``verb`` on ``vm`` with its input (the API's and the dashboard's entry point)."""
    command = WITH_INPUT.get(verb)
    if command is not None:
        return command(caller, vm, **params)
    if params:
        raise TypeError(f"{verb} takes no input, got {sorted(params)}")
    return ask(caller, vm, verb)


def start(caller: Caller, vm: VirtualMachine) -> Accepted:
    return ask(caller, vm, "start")


@transaction.atomic
def stop(
    caller: Caller, vm: VirtualMachine, *, force: bool = False, grace_s: int | None = None
) -> Accepted:
    grace = settings.SANDBOX_STOP_GRACE_S if grace_s is None else grace_s
    if not 0 <= grace <= 600:
        raise ValidationError({"grace_s": "must be between 0 and 600 seconds"})
    return Accepted(*_request(caller, vm, "stop", {"force": force, "grace_s": grace}))


def reboot(caller: Caller, vm: VirtualMachine) -> Accepted:
    return ask(caller, vm, "reboot")


def pause(caller: Caller, vm: VirtualMachine) -> Accepted:
    return ask(caller, vm, "pause")


def resume(caller: Caller, vm: VirtualMachine) -> Accepted:
    return ask(caller, vm, "resume")


@transaction.atomic
def resize(
    caller: Caller, vm: VirtualMachine, *, vcpus: int | None = None, memory_mib: int | None = None
) -> Accepted:
    if vcpus is None and memory_mib is None:
        raise ValidationError({"detail": "give vcpus, memory_mib or both"})
    new_vcpus = vm.vcpus if vcpus is None else vcpus
    new_memory = vm.memory_mib if memory_mib is None else memory_mib
    _validate_shape(new_vcpus, new_memory, vm.disk_mib)
    limits = quotas.effective_quota(vm.owner)  # definitions before the lock, as create does
    store.lock()
    fresh = _fresh(vm.pk)
    quotas.check(
        fresh.owner,
        quota=limits,
        budget_group_id=fresh.budget_group_id,
        vcpus=new_vcpus - fresh.vcpus,
        memory_mib=new_memory - fresh.memory_mib,
    )
    if fresh.state in lifecycle.HOLDS_HOST:  # a stopped VM is checked when it starts
        capacity.check_host(
            fresh.host,
            vcpus=new_vcpus - fresh.vcpus,
            memory_mib=new_memory - fresh.memory_mib,
        )
    data = {"vcpus": new_vcpus, "memory_mib": new_memory}
    return Accepted(*_request(caller, fresh, "resize", data, read_under_lock=True))


@transaction.atomic
def snapshot(caller: Caller, vm: VirtualMachine, *, name: str = "") -> Accepted:
    name = _validate_name(name or f"{vm.name}-snap", "name")
    limits = quotas.effective_quota(vm.owner)  # definitions before the lock, as create does
    store.lock()
    fresh = _fresh(vm.pk)
    policy.require(caller, "snapshot", fresh.owner_id)
    quotas.check(fresh.owner, quota=limits, budget_group_id=fresh.budget_group_id, snapshots=1)
    snapshot_id = uuid.uuid4()
    vm_id, event = _request(
        caller,
        fresh,
        "snapshot",
        {
            "snapshot_id": str(snapshot_id),
            "name": name,
            "parent_id": str(fresh.last_snapshot_id) if fresh.last_snapshot_id else None,
        },
        read_under_lock=True,
    )
    return Accepted(vm_id, event, Snapshot.objects.get(pk=snapshot_id))


@transaction.atomic
def restore(caller: Caller, vm: VirtualMachine, snap: Snapshot) -> Accepted:
    """Put ``vm`` back into the state of one of its own snapshots (in place)."""
    policy.require(caller, "restore", snap.owner_id)
    _check_snapshot_usable(snap)
    if snap.vm_id != vm.pk:
        raise ValidationError(
            {"snapshot": "restore in place takes a snapshot of this VM; clone others"}
        )
    return Accepted(*_request(caller, vm, "restore", {"snapshot_id": str(snap.pk)}), snapshot=snap)


def destroy(caller: Caller, vm: VirtualMachine) -> Accepted:
    return ask(caller, vm, "destroy")


# The verbs whose request takes input: their own function checks it (the others: ``ask``).
WITH_INPUT: dict[str, Callable[..., Accepted]] = {
    "stop": stop,
    "resize": resize,
    "snapshot": snapshot,
}


# --- Creation ---------------------------------------------------------------------------------


def _validate_name(name: str, field: str) -> str:
    name = (name or "").strip()
    if not name or len(name) > NAME_MAX or not all(c.isalnum() or c in "-_." for c in name):
        raise ValidationError({field: "1 to 63 letters, digits, '-', '_' or '.'"})
    return name


def _validate_shape(vcpus: int, memory_mib: int, disk_mib: int) -> None:
    errors = {}
    if not 1 <= vcpus:
        errors["vcpus"] = "at least 1"
    if memory_mib < 128:
        errors["memory_mib"] = "at least 128 MiB"
    if disk_mib < 64:
        errors["disk_mib"] = "at least 64 MiB"
    if errors:
        raise ValidationError(errors)
    quotas.check_vm_shape(vcpus, memory_mib, disk_mib)


def _requested(verb: str) -> str:
    return lifecycle.request_verb(verb).request_type()


OWNER_STAND_IN = -7_319_446_583
NAME_STAND_IN = "stand-in-vm-name"


@cached
def _name_taken_query() -> CompiledQuery:
    """One of the owner's live VMs with this name, if any (runs under the lock: compiled)."""
    qs = VirtualMachine.objects.filter(owner_id=OWNER_STAND_IN, name=NAME_STAND_IN)
    return CompiledQuery(
        qs.exclude(state=lifecycle.GONE).values("id")[:1],
        {"owner": OWNER_STAND_IN, "name": NAME_STAND_IN},
    )


VM_STAND_IN = uuid.UUID("5a4d0000-0000-4000-8000-00000000057a")
REQUEST_STAND_IN = "stand-in-request-event-id"
POSITION_STAND_IN = -7_319_446_589


@cached
def _vm_state_query() -> CompiledQuery:
    """A VM's state (read under the lock by the guest requests: compiled)."""
    return CompiledQuery(
        VirtualMachine.objects.filter(pk=VM_STAND_IN).values("state"), {"vm": VM_STAND_IN}
    )


@cached
def _pending_request_query() -> CompiledQuery:
    """A VM's pending request (read under the lock by the outcomes: compiled)."""
    return CompiledQuery(
        VirtualMachine.objects.filter(pk=VM_STAND_IN).values("pending_request"),
        {"vm": VM_STAND_IN},
    )


@cached
def _guest_outcome_query(outcomes: frozenset[str]) -> CompiledQuery:
    """An outcome of a guest request, if any (outcomes come after their request: the (type,
    position) index reads only what follows it)."""
    qs = Event.objects.filter(
        type__in=sorted(outcomes), position__gt=POSITION_STAND_IN, causation_id=REQUEST_STAND_IN
    )
    return CompiledQuery(
        qs.values("position")[:1], {"position": POSITION_STAND_IN, "request": REQUEST_STAND_IN}
    )


@dataclass(frozen=True)
class _Counted:
    """What a fork checked under the lock for all its new VMs at once: the budget they draw on."""

    budget: GroupBudget | None


def _new_vm_events(
    caller: Caller,
    *,
    name: str,
    template: Template | Snapshot,
    vcpus: int,
    memory_mib: int,
    disk_mib: int,
    source_snapshot: Snapshot | None,
    network: Network | None,
    request: tuple[str, dict[str, Any]] | None = None,
    secrets: list[dict[str, Any]] | None = None,
    secrets_seen: list[dict[str, Any]] | None = None,
    budget: str | None = None,
    timeout_s: int = 0,
    on_expiry: str = "stop",
    idle_timeout_s: int | None = None,
    idle_to_disk: bool = False,
    counted: _Counted | None = None,
    vm_id: uuid.UUID | None = None,
    pool_template: str | None = None,
    on_pool_member: Callable[[PoolMember, str], None] | None = None,
    priority: str = "normal",
    pressure_opt_out: bool = False,
) -> tuple[uuid.UUID, list[store.RecordedEvent], PoolMember | None]:
    """Take the lock, check the name and the quotas, lease an address on ``network``, append
    vm.created, net.ip_leased and ``request`` (the type and data of the new VM's first request,
    if any) in one append: (new id, events; the request last).

    ``budget``: the group whose team budget the VM draws from (``quotas.choose_budget``: by
    default the creator's only group with one). The quota definitions and the choice of budget
    are made before the lock, which is then held only for what concurrent requests change
    (usage, the budget's usage and limits, names, addresses) and the append.

    ``timeout_s``: its lifetime (seconds from now; 0: none), appended as vm.lifetime_set;
    ``on_expiry``: what its end does (its template's).
    ``idle_timeout_s``: its idle policy (``vms.idle``; None: none); ``idle_to_disk``: its idle
    pause suspends it to disk.
    ``counted``: the caller (a fork) holds the lock and has checked the quotas and the
    cluster's capacity for this VM among others; its budget was chosen then.

    ``pool_template``: take a ready warm pool member of that template on this host, if there is
    one (under the lock, and skipping rows another transaction holds), as the new VM: its id is
    the VM's, and pool.vm_handed_out is appended with the rest; ``on_pool_member`` is told
    first (``create``).
    """
    if counted is None:
        limits = quotas.effective_quota(caller.user)
        chosen = quotas.choose_budget(caller.user, budget)
    else:
        chosen = counted.budget
    store.lock()
    vm_id = vm_id or uuid.uuid4()
    if _name_taken_query().run(owner=caller.user.pk, name=name):
        raise ValidationError({"name": f"you already have a VM named {name!r}"})
    if counted is None:
        quotas.check(
            caller.user,
            quota=limits,
            budget_group_id=chosen.group_id if chosen is not None else None,
            vms=1,
            vcpus=vcpus,
            memory_mib=memory_mib,
            disk_mib=disk_mib,
        )
        capacity.check_cluster(vcpus=vcpus, memory_mib=memory_mib)  # no host chosen yet
    mac, ip = identity.allocate(network)
    if network is not None and ip is None:
        raise ValidationError({"network": f"the network {network.name} has no free address"})
    member = (
        _pick_pool_member(pool_template, vcpus=vcpus, memory_mib=memory_mib, disk_mib=disk_mib)
        if pool_template
        else None
    )
    if member is not None:
        vm_id = member.pk
        if on_pool_member is not None:
            on_pool_member(member, identity.hostname_for(name))
    created = store.PendingEvent(
        "vm",
        str(vm_id),
        "vm.created",
        {
            "name": name,
            "owner_id": caller.user.pk,
            "owner": caller.user.username,
            "template": template.template if isinstance(template, Snapshot) else template.name,
            "boot": template.boot,
            "image": template.image,
            "vcpus": vcpus,
            "memory_mib": memory_mib,
            "disk_mib": disk_mib,
            "hostname": identity.hostname_for(name),
            "mac": mac,
            "ip": ip,
            "source_snapshot_id": str(source_snapshot.pk) if source_snapshot else None,
            "network_id": str(network.pk) if network else None,
            "tap": identity.tap_for(vm_id) if network else "",
            "egress": network.default_egress if network else "none",
            # What the end of its lifetime does (its template's; vm.lifetime_set sets the end).
            "on_expiry": on_expiry,
            # Its idle policy (vms.idle): seconds without guest activity before it is paused.
            **({"idle_timeout_s": idle_timeout_s} if idle_timeout_s else {}),
            # ... and whether that pause suspends it to disk (its memory freed).
            **({"idle_to_disk": True} if idle_timeout_s and idle_to_disk else {}),
            # Who gives way first under host pressure (vms.pressure), and whether it never does.
            "priority": priority,
            "pressure_opt_out": pressure_opt_out,
            # Names, owners, versions and HMACs of the secrets it receives: never a value.
            **({"secrets": secrets} if secrets else {}),
            **({"from_pool": True} if member is not None else {}),
            **({"secrets_seen": secrets_seen} if secrets_seen else {}),
            # The team budget it draws from (vms.quotas), by group id and name.
            **(
                {"budget_group_id": chosen.group_id, "budget_group": chosen.group.name}
                if chosen is not None
                else {}
            ),
        },
        expected_version=0,
    )
    pending = [created]
    if network is not None:
        pending.append(
            store.PendingEvent(
                "vm",
                str(vm_id),
                "net.ip_leased",
                {"ip": ip, "mac": mac, "network_id": str(network.pk), "network": network.name},
                expected_version=1,
            )
        )
    if timeout_s:
        pending.append(
            store.PendingEvent(
                "vm",
                str(vm_id),
                "vm.lifetime_set",
                _lifetime_data(timeout_s, timezone.now(), on_expiry),
                expected_version=len(pending),
            )
        )
    if request is not None:
        # The same append: one head read, one INSERT, one projection pass for all events.
        pending.append(
            store.PendingEvent("vm", str(vm_id), *request, expected_version=len(pending))
        )
    if member is not None:
        pending.append(
            store.PendingEvent(
                "pool",
                str(member.pk),
                "pool.vm_handed_out",
                {
                    "vm_id": str(vm_id),
                    "template": member.template,
                    "host": member.host,
                    "owner_id": caller.user.pk,
                    "owner": caller.user.username,
                    "name": name,
                },
                expected_version=POOL_READY_VERSION,
            )
        )
    return vm_id, store.append_many(pending, actor=caller.actor), member


# A ready member's events: pool.vm_warming, pool.vm_warmed.
POOL_READY_VERSION = 2


def _pick_pool_member(
    template: str, *, vcpus: int, memory_mib: int, disk_mib: int
) -> PoolMember | None:
    """The oldest ready member of ``template``'s pool on this host that is what the VM will be
    recorded as (its shape, on the current guest image: one the refill has not evicted yet
    after a change of the template or the image is never handed out), locked for this
    transaction (PostgreSQL: rows another create holds are skipped, never shared; SQLite
    serialises writers). The caller holds the append lock."""
    image_id = images.current_image_id()
    if not image_id:
        return None
    qs = PoolMember.objects.filter(
        template=template,
        host=runtime.host_name(),
        state=PoolMember.State.READY,
        vcpus=vcpus,
        memory_mib=memory_mib,
        disk_mib=disk_mib,
        image_id=image_id,
    ).order_by("created_at")
    if connection.features.has_select_for_update_skip_locked:
        qs = qs.select_for_update(skip_locked=True)
    return qs.first()


def _network_for_new_vm(name: str | None, source: VirtualMachine | None = None) -> Network:
    """The network a new VM joins: the one named, else its source VM's, else the default
    (created from the settings if there is none yet)."""
    if name:
        found = Network.objects.filter(name=name).first()
        if found is None:
            raise ValidationError({"network": f"no network named {name!r}"})
        return found
    if source is not None and source.network_id is not None:
        found = Network.objects.filter(pk=source.network_id).first()
        if found is not None:
            return found
    default = Network.objects.filter(is_default=True).first()
    return default if default is not None else ensure_default_network()


@transaction.atomic
def create(
    caller: Caller,
    *,
    name: str,
    template: str,
    vcpus: int | None = None,
    memory_mib: int | None = None,
    disk_mib: int | None = None,
    start_now: bool = True,
    network: str | None = None,
    secrets: list[dict[str, Any]] | None = None,
    budget: str | None = None,
    timeout_s: int | None = None,
    from_pool: bool = False,
    on_pool_member: Callable[[PoolMember, str], None] | None = None,
    priority: str | None = None,
    pressure_opt_out: bool | None = None,
) -> Accepted:
    """A new VM from ``template``. ``from_pool``: the caller can finish a hand-out
    (``vms.pools.create``): a started VM of the template's own shape, with no file secrets, is
    then a ready warm pool member of this host when there is one (``Accepted.pooled``; its
    start request is not enqueued). ``on_pool_member(member, hostname)`` is called as soon as
    that member is taken, under the append lock and in this transaction (before the VM's events
    are appended): the hand-out may begin the guest's part meanwhile. ``timeout_s``: its
    lifetime in seconds (0: none; None: the template's, if it has one); at its end the system
    stops or destroys it (``vms.lifetimes``).
    ``priority`` (high, normal, low) and ``pressure_opt_out``: how it fares under host pressure
    (``vms.pressure``; None: the template's).
    ``secrets``: references to secrets of the caller's (or its
    groups') that the guest receives as variables of every exec or files written at every start
    (``secretstore.guests``); checked now, recorded by name, owner, version and HMAC.
    ``budget``: the name of the group whose team budget it draws from (``vms.quotas``)."""
    policy.require(caller, "create")
    name = _validate_name(name, "name")
    refs = guests.validate_refs(secrets)
    tpl = Template.objects.filter(name=template, enabled=True).first()
    if tpl is None:
        raise ValidationError({"template": f"no enabled template named {template!r}"})
    given = _template_secrets(caller, tpl, refs) + guests.resolve(caller.user, refs, caller=caller)
    shape = (vcpus or tpl.vcpus, memory_mib or tpl.memory_mib, disk_mib or tpl.disk_mib)
    _validate_shape(*shape)
    lifetime, _ = _lifetime_for(tpl, timeout_s)
    prio = validate_priority(tpl.priority if priority is None else priority)
    opt_out = validate_opt_out(
        tpl.pressure_opt_out if pressure_opt_out is None else pressure_opt_out
    )
    poolable = (
        from_pool
        and start_now
        and tpl.boot == "linux"
        and shape == (tpl.vcpus, tpl.memory_mib, tpl.disk_mib)
        and not any(g.file for g in given)
    )
    vm_id, events, member = _new_vm_events(
        caller,
        name=name,
        template=tpl,
        vcpus=shape[0],
        memory_mib=shape[1],
        disk_mib=shape[2],
        source_snapshot=None,
        network=_network_for_new_vm(network),
        request=(_requested("start"), {}) if start_now else None,
        secrets=[g.record() for g in given],
        budget=budget,
        timeout_s=lifetime,
        on_expiry=tpl.on_expiry,
        idle_timeout_s=tpl.idle_timeout_s,
        idle_to_disk=tpl.idle_to_disk,
        pool_template=tpl.name if poolable else None,
        on_pool_member=on_pool_member,
        priority=prio,
        pressure_opt_out=opt_out,
    )
    if not start_now:
        return Accepted(vm_id, events[0])
    if member is not None:
        request = next(e for e in events if e.type == _requested("start"))
        return Accepted(vm_id, request, pooled=member, hostname=identity.hostname_for(name))
    _enqueue_on_commit(events[-1])
    return Accepted(vm_id, events[-1])


def _template_secrets(
    caller: Caller, tpl: Template, refs: list[dict[str, str]]
) -> list[guests.Given]:
    """The secrets ``tpl`` gives every VM made from it, as the creator may use them; a request's
    own reference wins for the same variable or file. One the creator cannot use is refused."""
    mine = {r.get("env") or r.get("file") for r in refs}
    inherited = [
        r
        for r in guests.validate_refs(tpl.secrets or [])
        if (r.get("env") or r.get("file")) not in mine
    ]
    try:
        return guests.resolve(caller.user, inherited, caller=caller)
    except ValidationError as exc:
        raise ValidationError(
            {"secrets": [f"template {tpl.name}: {m}" for m in exc.messages]}
        ) from exc


def _check_snapshot_usable(snap: Snapshot) -> None:
    """A restore or clone of ``snap`` could be carried out: it is ready and this host keeps the
    image it was taken on (the worker checks again, as the last line)."""
    if snap.state != Snapshot.State.READY:
        raise ValidationError({"snapshot": f"the snapshot is {snap.state}, not ready"})
    try:
        images.snapshot_image(snap.image_id)
    except images.ImageNotBuilt as exc:
        raise ValidationError(
            {"snapshot": f"snapshot {snap.name} cannot be restored: {exc}"}
        ) from exc


def _lifetime_for(tpl: Template | None, timeout_s: int | None) -> tuple[int, str]:
    """A new VM's lifetime (seconds; 0: none) and what its end does: ``timeout_s`` as asked,
    None for its template's (none when the template is gone or has none)."""
    default = (tpl.timeout_s or 0) if tpl is not None else 0
    lifetime = validate_timeout(default if timeout_s is None else timeout_s)
    return lifetime, tpl.on_expiry if tpl is not None else "stop"


@transaction.atomic
def clone(
    caller: Caller,
    snap: Snapshot,
    *,
    name: str,
    budget: str | None = None,
    timeout_s: int | None = None,
) -> Accepted:
    """A new VM, with its own identity, started from ``snap``; ``budget`` and ``timeout_s`` (its
    lifetime; None: the lifetime of the template its snapshot's VM came from) as for
    ``create``."""
    policy.require(caller, "clone", snap.owner_id)
    _check_snapshot_usable(snap)
    name = _validate_name(name, "name")
    lifetime, on_expiry = _lifetime_for(
        Template.objects.filter(name=snap.template).first(), timeout_s
    )
    vm_id, events, _ = _new_vm_events(
        caller,
        name=name,
        template=snap,
        vcpus=snap.vcpus,
        memory_mib=snap.memory_mib,
        disk_mib=snap.disk_mib,
        source_snapshot=snap,
        network=_network_for_new_vm(None, snap.vm),
        request=(
            _requested("restore"),
            {"snapshot_id": str(snap.pk), "clone": True},
        ),
        # The clone's guest holds what its source's held: its secrets and their masking.
        secrets=list(snap.vm.secrets) if snap.vm is not None else None,
        secrets_seen=list(snap.vm.secrets_seen) if snap.vm is not None else None,
        budget=budget,
        timeout_s=lifetime,
        on_expiry=on_expiry,
    )
    _enqueue_on_commit(events[-1])
    return Accepted(vm_id, events[-1], snap)


# --- Fork: snapshot once, restore N times ------------------------------------------------------


@dataclass(frozen=True)
class Forked:
    """A fork the log has taken: the source's snapshot request (the worker takes the snapshot,
    then starts every new VM's restore) and the new VMs with their restore requests."""

    source_id: uuid.UUID
    request: store.RecordedEvent
    snapshot: Snapshot
    vms: list[Accepted]


def _fork_names(caller: Caller, source: VirtualMachine, count: int) -> list[str]:
    """``<source>-fork-<k>`` for the first ``count`` k from 1 that name none of the caller's
    live VMs (the source's name cut so that the name fits); under the lock."""
    stem = f"{source.name[: NAME_MAX - 10]}-fork-"
    names: list[str] = []
    k = 0
    while len(names) < count:
        k += 1
        if not _name_taken_query().run(owner=caller.user.pk, name=f"{stem}{k}"):
            names.append(f"{stem}{k}")
    return names


def validate_fork_count(count: Any) -> int:
    limit = forks.fork_limit()
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= limit:
        raise ValidationError({"count": f"a whole number from 1 to {limit} (SANDBOX_FORK_MAX)"})
    return count


@transaction.atomic
def fork(
    caller: Caller,
    vm: VirtualMachine,
    *,
    count: int,
    names: list[str] | None = None,
    budget: str | None = None,
) -> Forked:
    """``count`` new VMs from ``vm``'s state of now, each with its own identity (name, hostname,
    MAC and address, agent credential), as E2B's fork: one snapshot of ``vm`` (its ordinary
    snapshot request, data ``fork``: the new VMs), then each new VM restored from it (its
    restore request, data ``fork_of``), carried out by the worker once the snapshot is taken.

    All of it is checked under the lock before anything is appended, in one transaction: the
    source running, the snapshot quota (the source's owner's), and the quotas, team budget and
    cluster capacity for all ``count`` VMs at once (the caller's: they are its VMs). ``names``:
    one per VM (default ``<source>-fork-<k>``); ``budget`` as for ``create`` (default the
    source's team budget, if it has one)."""
    row = lifecycle.verb("fork")
    policy.require(caller, row.name, vm.owner_id)
    count = validate_fork_count(count)
    if names is not None:
        if len(names) != count:
            raise ValidationError({"names": f"one name per VM: {count}"})
        names = [_validate_name(n, "names") for n in names]
        if len(set(names)) != count:
            raise ValidationError({"names": "each name once"})
    if budget is None and vm.budget_group_id is not None:
        budget = Group.objects.filter(pk=vm.budget_group_id).values_list("name", flat=True).first()
    owner_limits = quotas.effective_quota(vm.owner)  # definitions before the lock
    limits = quotas.effective_quota(caller.user)
    chosen = quotas.choose_budget(caller.user, budget)
    network = _network_for_new_vm(None, vm)
    # As a clone: the lifetime of the template the source came from (vms.lifetimes).
    lifetime, on_expiry = _lifetime_for(Template.objects.filter(name=vm.template).first(), None)
    store.lock()
    source = _fresh(vm.pk)
    if source.busy:
        raise Busy(source, row.name)
    if source.state not in row.allowed_from:
        raise InvalidState(source, row.name, row.allowed_from)
    names = names or _fork_names(caller, source, count)
    quotas.check(
        source.owner, quota=owner_limits, budget_group_id=source.budget_group_id, snapshots=1
    )
    quotas.check(
        caller.user,
        quota=limits,
        budget_group_id=chosen.group_id if chosen is not None else None,
        vms=count,
        vcpus=count * source.vcpus,
        memory_mib=count * source.memory_mib,
        disk_mib=count * source.disk_mib,
    )
    capacity.check_cluster(vcpus=count * source.vcpus, memory_mib=count * source.memory_mib)
    snapshot_id = uuid.uuid4()
    vm_ids = [uuid.uuid4() for _ in names]
    _, request = _request(
        caller,
        source,
        "snapshot",
        {
            "snapshot_id": str(snapshot_id),
            "name": _validate_name(
                f"{source.name[: NAME_MAX - 16]}-fork-{snapshot_id.hex[:8]}", "name"
            ),
            "parent_id": str(source.last_snapshot_id) if source.last_snapshot_id else None,
            "fork": {"count": count, "vm_ids": [str(i) for i in vm_ids], "names": names},
        },
        read_under_lock=True,
    )
    snap = Snapshot.objects.get(pk=snapshot_id)
    made: list[Accepted] = []
    for vm_id, name in zip(vm_ids, names, strict=True):
        new_id, events, _ = _new_vm_events(
            caller,
            name=name,
            template=snap,
            vcpus=source.vcpus,
            memory_mib=source.memory_mib,
            disk_mib=source.disk_mib,
            source_snapshot=snap,
            network=network,
            # Not enqueued now: the worker starts it once the snapshot is taken (vms.worker).
            request=(
                _requested("restore"),
                {
                    "snapshot_id": str(snapshot_id),
                    "clone": True,
                    "fork_of": str(source.pk),
                    "fork_request": str(request.event_id),
                },
            ),
            secrets=list(source.secrets),
            secrets_seen=list(source.secrets_seen),
            timeout_s=lifetime,
            on_expiry=on_expiry,
            idle_timeout_s=source.idle_timeout_s,
            idle_to_disk=source.idle_to_disk,
            counted=_Counted(chosen),
            vm_id=vm_id,
        )
        made.append(Accepted(new_id, events[-1], snap))
    return Forked(source.pk, request, snap, made)


@transaction.atomic
def delete_snapshot(
    caller: Caller, snap: Snapshot, *, reason: str = "user", enforce_permissions: bool = True
) -> store.RecordedEvent:
    """Delete a snapshot (its files go; its record stays). Retention passes
    ``enforce_permissions=False``: the policy, not a user, decides."""
    if enforce_permissions:
        policy.require(caller, "delete_snapshot", snap.owner_id)
    if snap.state == Snapshot.State.DELETED:
        raise ValidationError({"snapshot": "already deleted"})
    if snap.state == Snapshot.State.CREATING:
        raise ValidationError({"snapshot": "still being taken"})
    event = store.append(
        "snapshot",
        str(snap.pk),
        "snapshot.deleted",
        {"reason": reason, "vm_id": str(snap.vm_id) if snap.vm_id else None, "name": snap.name},
        actor=caller.actor,
        expected_version=snap.version,
    )
    transaction.on_commit(lambda: enqueue.snapshot_cleanup(str(snap.pk)))
    return event


# --- Networks, port forwards, egress ------------------------------------------------------------

NETWORK_FIELDS = (
    "name",
    "subnet",
    "bridge",
    "isolated",
    "port_min",
    "port_max",
    "default_egress",
    "is_default",
)
# What may change while VMs are on the network (the others: only on an empty one).
NETWORK_LIVE_FIELDS = frozenset({"name", "isolated", "port_min", "port_max", "default_egress"})
NETWORK_LIVE_FIELDS |= {"is_default"}
SYSTEM = Actor.system(channel="system", name="networks")


def _network_data(fields: dict[str, Any]) -> dict[str, Any]:
    """Checked and canonical network fields (only those given); ValidationError names each."""
    out: dict[str, Any] = {}
    if "name" in fields:
        name = fields["name"]
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", name):
            raise ValidationError({"name": "1 to 63 lowercase letters, digits or '-'"})
        out["name"] = name
    if "subnet" in fields:
        net = netconfig.check_subnet(fields["subnet"])
        out["subnet"] = str(net)
        out["gateway"] = identity.gateway(str(net))
    if "bridge" in fields:
        out["bridge"] = netconfig.check_bridge(fields["bridge"])
    for flag in ("isolated", "is_default"):
        if flag in fields:
            if not isinstance(fields[flag], bool):
                raise ValidationError({flag: "true or false"})
            out[flag] = fields[flag]
    if "default_egress" in fields:
        out["default_egress"] = netconfig.check_egress(fields["default_egress"], "default_egress")
    return out


def _check_network_conflicts(data: dict[str, Any], network: Network | None) -> None:
    """Under the lock: names, bridges and subnets are each another network's at most once, and
    no subnet overlaps another or the host link."""
    others = Network.objects.all() if network is None else Network.objects.exclude(pk=network.pk)
    if "name" in data and others.filter(name=data["name"]).exists():
        raise ValidationError({"name": f"a network named {data['name']!r} exists"})
    if "bridge" in data and others.filter(bridge=data["bridge"]).exists():
        raise ValidationError({"bridge": f"the bridge {data['bridge']} is another network's"})
    if "subnet" in data:
        subnet = ipaddress.IPv4Network(data["subnet"])
        link = ipaddress.ip_network(settings.SANDBOX_NET_HOST_LINK)
        if subnet.overlaps(link):
            raise ValidationError({"subnet": "overlaps the host link (SANDBOX_NET_HOST_LINK)"})
        for other in others.values_list("name", "subnet"):
            if subnet.overlaps(ipaddress.IPv4Network(other[1])):
                raise ValidationError({"subnet": f"overlaps the network {other[0]} ({other[1]})"})


def _unset_default(network_id: uuid.UUID) -> list[store.PendingEvent]:
    """The events that take the default flag from the current default network (if it is
    another one): a network becomes the default in the same append."""
    current = Network.objects.filter(is_default=True).exclude(pk=network_id).first()
    if current is None:
        return []
    return [
        store.PendingEvent(
            "network",
            str(current.pk),
            "net.network_updated",
            {"changes": {"is_default": False}},
            expected_version=current.version,
        )
    ]


@transaction.atomic
def create_network(caller: Caller, **fields: Any) -> Network:
    """Define a network (admins): name, subnet, bridge, isolated, port_min, port_max,
    default_egress, is_default. Appends net.network_created."""
    policy.require_network_admin(caller, "add")
    return _create_network(caller.actor, fields)


def _create_network(actor: Actor, fields: dict[str, Any]) -> Network:
    unknown = set(fields) - set(NETWORK_FIELDS)
    if unknown:
        raise ValidationError({"detail": f"unknown fields {sorted(unknown)}"})
    missing = [f for f in ("name", "subnet", "bridge", "port_min", "port_max") if f not in fields]
    if missing:
        raise ValidationError(dict.fromkeys(missing, "this field is required"))
    data = {"isolated": True, "default_egress": "none", "is_default": False}
    data |= _network_data(fields)
    data["port_min"], data["port_max"] = netconfig.check_port_range(
        fields["port_min"], fields["port_max"]
    )
    store.lock()
    _check_network_conflicts(data, None)
    network_id = uuid.uuid4()
    pending = _unset_default(network_id) if data["is_default"] else []
    pending.append(
        store.PendingEvent(
            "network", str(network_id), "net.network_created", data, expected_version=0
        )
    )
    store.append_many(pending, actor=actor)
    return Network.objects.get(pk=network_id)


@transaction.atomic
def update_network(caller: Caller, network: Network, **fields: Any) -> Network:
    """Change a network's settings (admins). Its subnet and bridge change only while no VM is
    on it; its port range only so that every forward stays inside; the default flag moves to
    another network by setting it there. Appends net.network_updated (the changed values)."""
    policy.require_network_admin(caller, "change")
    unknown = set(fields) - set(NETWORK_FIELDS)
    if unknown:
        raise ValidationError({"detail": f"unknown fields {sorted(unknown)}"})
    data = _network_data(fields)
    store.lock()
    fresh = Network.objects.filter(pk=network.pk).first()
    if fresh is None:
        raise NotFound(f"no network {network.pk}")
    port_min = fields.get("port_min", fresh.port_min)
    port_max = fields.get("port_max", fresh.port_max)
    if "port_min" in fields or "port_max" in fields:
        data["port_min"], data["port_max"] = netconfig.check_port_range(port_min, port_max)
        outside = PortForward.objects.filter(vm__network=fresh).exclude(
            host_port__range=(port_min, port_max)
        )
        if outside.exists():
            raise ValidationError({"port_min": "forwards of this network use ports outside"})
    changes = {k: v for k, v in data.items() if getattr(fresh, k) != v}
    if not changes:
        return fresh
    if set(changes) - NETWORK_LIVE_FIELDS - {"gateway"} and _vms_on(fresh).exists():
        raise ValidationError({"subnet": "VMs are on this network: its subnet and bridge stay"})
    if changes.get("is_default") is False:
        raise ValidationError({"is_default": "make another network the default instead"})
    _check_network_conflicts(changes, fresh)
    pending = _unset_default(fresh.pk) if changes.get("is_default") else []
    pending.append(
        store.PendingEvent(
            "network",
            str(fresh.pk),
            "net.network_updated",
            {"changes": changes},
            expected_version=fresh.version,
        )
    )
    store.append_many(pending, actor=caller.actor)
    if "isolated" in changes:  # the VMs already on it follow now, not at their next start
        network_id = str(fresh.pk)
        transaction.on_commit(lambda: enqueue.network_bridge(network_id))
    return Network.objects.get(pk=fresh.pk)


def _vms_on(network: Network) -> Any:
    return VirtualMachine.objects.filter(network=network).exclude(state=lifecycle.GONE)


@transaction.atomic
def delete_network(caller: Caller, network: Network) -> store.RecordedEvent:
    """Delete a network (admins): never the default one, nor one a VM is on."""
    policy.require_network_admin(caller, "delete")
    store.lock()
    fresh = Network.objects.filter(pk=network.pk).first()
    if fresh is None:
        raise NotFound(f"no network {network.pk}")
    if fresh.is_default:
        raise ValidationError({"network": "the default network stays: make another the default"})
    if _vms_on(fresh).exists():
        raise ValidationError({"network": "VMs are on this network: destroy them first"})
    return store.append(
        "network",
        str(fresh.pk),
        "net.network_deleted",
        {"name": fresh.name, "subnet": fresh.subnet},
        actor=caller.actor,
        expected_version=fresh.version,
    )


@transaction.atomic
def ensure_default_network(actor: Actor = SYSTEM) -> Network:
    """The default network, defined from the settings (SANDBOX_NETWORK_CIDR, _BRIDGE, _PORTS,
    SANDBOX_DEFAULT_EGRESS) if there is none: after every migrate, and by the first create."""
    store.lock()
    found = Network.objects.filter(is_default=True).first()
    if found is not None:
        return found
    spec = netconfig.default_network_spec()
    if Network.objects.filter(name=spec["name"]).exists():
        spec["name"] = f"default-{uuid.uuid4().hex[:8]}"
    return _create_network(actor, spec)


def _forward_data(forward: PortForward) -> dict[str, Any]:
    return {
        "forward_id": str(forward.pk),
        "protocol": forward.protocol,
        "guest_port": forward.guest_port,
        "host_port": forward.host_port,
    }


_GOING = frozenset({lifecycle.GONE, lifecycle.request_verb("destroy").transitional})


def _vm_with_nic(vm: VirtualMachine, verb: str) -> tuple[VirtualMachine, Network]:
    """Under the lock: the VM as it is now, with its network; not one being destroyed."""
    fresh = _fresh(vm.pk)
    if fresh.state in _GOING:
        raise InvalidState(
            fresh,
            verb.replace("_", " ") + " of",
            lifecycle.ALL_STATES - {"destroying", "destroyed"},
        )
    if fresh.network_id is None or fresh.ip is None:
        raise ValidationError({"detail": "the VM has no network interface"})
    network = Network.objects.get(pk=fresh.network_id)
    return fresh, network


def _rules_on_commit(vm_id: uuid.UUID) -> None:
    transaction.on_commit(lambda: enqueue.network_rules(str(vm_id)))


@transaction.atomic
def add_port_forward(
    caller: Caller,
    vm: VirtualMachine,
    *,
    protocol: str,
    guest_port: int,
    host_port: int | None = None,
) -> PortForward:
    """Forward a host port (the one asked for, else the lowest free one of the VM's network's
    range) to ``guest_port`` of the VM's guest. A host port is given once per protocol over
    all networks: chosen under the event store's lock, backed by a unique constraint."""
    policy.require(caller, "add_port_forward", vm.owner_id)
    if protocol not in netconfig.PROTOCOLS:
        raise ValidationError({"protocol": "tcp or udp"})
    for field, port in (("guest_port", guest_port), ("host_port", host_port)):
        if port is None and field == "host_port":
            continue
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValidationError({field: "a port between 1 and 65535"})
    store.lock()
    fresh, network = _vm_with_nic(vm, "add_port_forward")
    most = settings.SANDBOX_NET_MAX_FORWARDS_PER_VM
    if PortForward.objects.filter(vm=fresh).count() >= most:
        raise ValidationError({"detail": f"a VM has at most {most} port forwards"})
    taken = set(
        PortForward.objects.filter(
            protocol=protocol, host_port__range=(network.port_min, network.port_max)
        ).values_list("host_port", flat=True)
    )
    if host_port is not None:
        if not network.port_min <= host_port <= network.port_max:
            raise ValidationError(
                {"host_port": f"outside the network's range {network.port_min}-{network.port_max}"}
            )
        if host_port in taken:
            raise ValidationError({"host_port": f"{protocol}/{host_port} is forwarded already"})
        chosen = host_port
    else:
        free = (p for p in range(network.port_min, network.port_max + 1) if p not in taken)
        found = next(free, None)
        if found is None:
            raise ValidationError({"host_port": f"no free {protocol} port on {network.name}"})
        chosen = found
    forward_id = uuid.uuid4()
    store.append(
        "vm",
        str(fresh.pk),
        "net.port_forward_added",
        {
            "forward_id": str(forward_id),
            "protocol": protocol,
            "guest_port": guest_port,
            "host_port": chosen,
            "network_id": str(network.pk),
        },
        actor=caller.actor,
        expected_version=fresh.version,
    )
    _rules_on_commit(fresh.pk)
    return PortForward.objects.get(pk=forward_id)


@transaction.atomic
def remove_port_forward(
    caller: Caller, vm: VirtualMachine, forward: PortForward
) -> store.RecordedEvent:
    policy.require(caller, "remove_port_forward", vm.owner_id)
    store.lock()
    fresh = _fresh(vm.pk)
    current = PortForward.objects.filter(pk=forward.pk, vm=fresh).first()
    if current is None:
        raise NotFound(f"no forward {forward.pk} on this VM")
    event = store.append(
        "vm",
        str(fresh.pk),
        "net.port_forward_removed",
        {**_forward_data(current), "reason": "user"},
        actor=caller.actor,
        expected_version=fresh.version,
    )
    _rules_on_commit(fresh.pk)
    return event


@transaction.atomic
def set_egress(
    caller: Caller, vm: VirtualMachine, *, egress: str, allow: list[str] | None = None
) -> store.RecordedEvent:
    """Set what the VM may reach outside its network: none, an allow list (CIDRs and domain
    names) or the internet. Appends net.egress_policy_changed with the previous policy."""
    policy.require(caller, "set_egress", vm.owner_id)
    egress = netconfig.check_egress(egress)
    entries = netconfig.check_allow_list(list(allow or []))
    if entries and egress != "allow-list":
        raise ValidationError({"allow": "an allow list goes with egress allow-list only"})
    store.lock()
    fresh, _network = _vm_with_nic(vm, "set_egress")
    event = store.append(
        "vm",
        str(fresh.pk),
        "net.egress_policy_changed",
        {
            "egress": egress,
            "allow": entries,
            "previous": {"egress": fresh.egress, "allow": list(fresh.egress_allow)},
        },
        actor=caller.actor,
        expected_version=fresh.version,
    )
    _rules_on_commit(fresh.pk)
    return event


# --- Lifetimes (vms.lifetimes) ------------------------------------------------------------------

LIFETIME = Actor.system(channel="worker", name="lifetime")


def validate_timeout(timeout_s: Any) -> int:
    """A lifetime in whole seconds from now, 0 (none) to SANDBOX_VM_LIFETIME_MAX_S."""
    limit = int(settings.SANDBOX_VM_LIFETIME_MAX_S)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int):
        raise ValidationError({"timeout_s": "whole seconds (an integer)"})
    if not 0 <= timeout_s <= limit:
        raise ValidationError({"timeout_s": f"0 (no lifetime) to {limit} seconds"})
    return timeout_s


def _lifetime_data(timeout_s: int, now: datetime, on_expiry: str) -> dict[str, Any]:
    expires = now + timedelta(seconds=timeout_s) if timeout_s else None
    return {
        "timeout_s": timeout_s,
        "expires_at": expires.isoformat() if expires else None,
        "on_expiry": on_expiry,
    }


@transaction.atomic
def set_lifetime(caller: Caller, vm: VirtualMachine, *, timeout_s: int) -> store.RecordedEvent:
    """Set, extend or clear (0) the VM's lifetime: it ends ``timeout_s`` seconds from now, when
    the system asks its stop or destroy (``on_expiry``, its template's). Appends vm.lifetime_set."""
    row = lifecycle.verb("set_lifetime")
    policy.require(caller, row.name, vm.owner_id)
    timeout_s = validate_timeout(timeout_s)
    store.lock()
    fresh = _fresh(vm.pk)
    if fresh.state not in row.allowed_from:
        raise InvalidState(fresh, row.name, row.allowed_from)
    return store.append(
        "vm",
        str(fresh.pk),
        "vm.lifetime_set",
        _lifetime_data(timeout_s, timezone.now(), fresh.on_expiry),
        actor=caller.actor,
        expected_version=fresh.version,
    )


@transaction.atomic
def expire_lifetime(vm_id: uuid.UUID, now: datetime) -> store.RecordedEvent | None:
    """The end of a VM's lifetime, if it has come: the system asks its stop or destroy (the
    ordinary request of the table, data ``{"reason": "lifetime", "expired_at"}``), which clears
    its end (the projector), so it is asked once. A VM already where that request would leave it
    (a stopped VM to stop) gets its lifetime cleared instead (vm.lifetime_set with the reason);
    a VM busy with another request is left for a later tick (a destroy overtakes it), and one
    already being destroyed has its end asked for.
    None when there was nothing to do."""
    store.lock()
    vm = VirtualMachine.objects.filter(pk=vm_id).first()
    if vm is None or vm.expires_at is None or vm.expires_at > now:
        return None
    row = lifecycle.request_verb(vm.on_expiry)
    reason = {"reason": "lifetime", "expired_at": vm.expires_at.isoformat()}
    if (vm.busy and not row.overtakes) or vm.pending_type == row.request_type():
        return None  # later (or never: what its end asks for is already asked, a destroy)
    if vm.state not in row.allowed_from:
        return store.append(
            "vm",
            str(vm.pk),
            "vm.lifetime_set",
            {**_lifetime_data(0, now, vm.on_expiry), **reason},
            actor=LIFETIME,
            expected_version=vm.version,
        )
    data: dict[str, Any] = dict(reason)
    if row.name == "stop":
        data |= {"force": False, "grace_s": settings.SANDBOX_STOP_GRACE_S}
    event = store.append(
        "vm", str(vm.pk), row.request_type(), data, actor=LIFETIME, expected_version=vm.version
    )
    _enqueue_on_commit(event)
    return event


# --- Idle pause (vms.idle) ---------------------------------------------------------------------

IDLE = Actor.system(channel="worker", name="idle")


def validate_idle_timeout(idle_timeout_s: Any) -> int | None:
    """An idle timeout in whole seconds, 1 to SANDBOX_IDLE_TIMEOUT_MAX_S, or None (never)."""
    if idle_timeout_s is None:
        return None
    limit = int(settings.SANDBOX_IDLE_TIMEOUT_MAX_S)
    if isinstance(idle_timeout_s, bool) or not isinstance(idle_timeout_s, int):
        raise ValidationError({"idle_timeout_s": "whole seconds (an integer), or null"})
    if not 1 <= idle_timeout_s <= limit:
        raise ValidationError({"idle_timeout_s": f"1 to {limit} seconds, or null (never)"})
    return idle_timeout_s


def validate_idle_to_disk(idle_to_disk: Any, idle_timeout_s: int | None) -> bool:
    """Whether the idle pause suspends to disk: true or false, and true only with a timeout."""
    if not isinstance(idle_to_disk, bool):
        raise ValidationError({"idle_to_disk": "true or false"})
    if idle_to_disk and idle_timeout_s is None:
        raise ValidationError({"idle_to_disk": "needs an idle_timeout_s (the policy it modifies)"})
    return idle_to_disk


@transaction.atomic
def set_idle(
    caller: Caller,
    vm: VirtualMachine,
    *,
    idle_timeout_s: int | None,
    idle_to_disk: bool = False,
) -> store.RecordedEvent:
    """Set (seconds without guest activity before the system pauses it) or clear (None) the
    VM's idle policy; ``idle_to_disk``: that pause suspends it to disk (its memory and device
    state saved to a file, its VMM stopped and its memory freed). Appends vm.idle_policy_set."""
    row = lifecycle.verb("set_idle")
    policy.require(caller, row.name, vm.owner_id)
    idle_timeout_s = validate_idle_timeout(idle_timeout_s)
    idle_to_disk = validate_idle_to_disk(idle_to_disk, idle_timeout_s)
    store.lock()
    fresh = _fresh(vm.pk)
    if fresh.state not in row.allowed_from:
        raise InvalidState(fresh, row.name, row.allowed_from)
    return store.append(
        "vm",
        str(fresh.pk),
        "vm.idle_policy_set",
        {"idle_timeout_s": idle_timeout_s, "idle_to_disk": idle_to_disk},
        actor=caller.actor,
        expected_version=fresh.version,
    )


# A guest request older than its verb's time limit plus this has no process waiting for it any
# more: the reconciler settles it as interrupted (vms.reconcile).
GUEST_MARGIN_S = 300


def guest_request_in_flight(vm_id: uuid.UUID | str, now: datetime) -> bool:
    """Has the VM a guest request (exec, file upload or download) asked and not yet answered
    (no outcome caused by it)? Only requests young enough to still be carried out count (older
    ones are the reconciler's to settle). Two queries on the VM's own events."""
    window = max(float(getattr(settings, v.time_limit or "")) for v in lifecycle.GUEST_VERBS)
    asked = list(
        Event.objects.filter(
            aggregate_type="vm",
            aggregate_id=str(vm_id),
            type__in=list(_GUEST_REQUESTS),
            recorded_at__gte=now - timedelta(seconds=window + GUEST_MARGIN_S),
        ).values_list("event_id", flat=True)
    )
    if not asked:
        return False
    answered = Event.objects.filter(
        aggregate_type="vm",
        aggregate_id=str(vm_id),
        type__in=sorted(set().union(*GUEST_OUTCOMES.values())),
        causation_id__in=[str(a) for a in asked],
    ).count()
    return answered < len(asked)


@transaction.atomic
def pause_idle(vm_id: uuid.UUID, now: datetime) -> store.RecordedEvent | None:
    """The system's pause of a VM its idle policy says is unused: the ordinary pause request,
    data ``{"reason": "idle", "idle_s", "idle_timeout_s"}``, with ``"to_disk": true`` when the
    policy suspends it to disk (``vms.worker.suspend_to_disk``). Everything is decided under the
    append lock, from what holds then: the VM still has an idle policy, may be paused, is busy
    with no request of its own and has no guest request in flight (an exec running for longer
    than the policy keeps its VM awake), and its last use (``VMActivity``, written when a guest
    request starts and when its outcome is recorded) or change of state is at least the
    policy's timeout before ``now``; ``idle_s`` is that measure. None when there was nothing to
    do."""
    store.lock()
    vm = VirtualMachine.objects.filter(pk=vm_id).first()
    if vm is None or vm.idle_timeout_s is None or vm.busy or not lifecycle.may_idle(vm.state):
        return None
    used = VMActivity.objects.filter(vm_id=vm.pk).values_list("last_at", flat=True).first()
    since = max(vm.state_changed_at, used) if used else vm.state_changed_at
    idle_s = (now - since).total_seconds()
    if idle_s < vm.idle_timeout_s or guest_request_in_flight(vm.pk, now):
        return None
    data: dict[str, Any] = {
        "reason": "idle",
        "idle_s": round(idle_s, 1),
        "idle_timeout_s": vm.idle_timeout_s,
    }
    if vm.idle_to_disk:
        data["to_disk"] = True  # suspended to disk: its VMM stopped, its memory freed
    event = store.append(
        "vm",
        str(vm.pk),
        lifecycle.request_verb("pause").request_type(),
        data,
        actor=IDLE,
        expected_version=vm.version,
    )
    _enqueue_on_commit(event)
    return event


@transaction.atomic(durable=True)
def request_activity_resume(
    caller: Caller, vm: VirtualMachine, kind: str, *, claimed_by: str
) -> store.RecordedEvent | None:
    """Before ``kind`` (exec, file_upload, file_download) reaches a VM the system paused for
    idleness: its resume request (the system's, data ``{"reason": "activity", "for": kind,
    "by"}``) and the claim of it by this web process, committed, for the caller to carry out at
    once (``vms.idle.wake``). The caller must be allowed ``kind`` on the VM. None when the VM is
    no longer one to wake (resumed meanwhile, or paused by its owner since)."""
    policy.require(caller, kind, vm.owner_id)
    store.lock()
    fresh = _fresh(vm.pk)
    if fresh.busy or not lifecycle.wakes_on_activity(fresh.state, fresh.idle_paused):
        return None
    if fresh.suspended_to_disk:  # its VMM is launched again: it must fit
        capacity.check_host(fresh.host, vcpus=fresh.vcpus, memory_mib=fresh.memory_mib)
    event = store.append(
        "vm",
        str(fresh.pk),
        lifecycle.request_verb("resume").request_type(),
        {"reason": "activity", "for": kind, "by": caller.actor.username},
        actor=IDLE,
        expected_version=fresh.version,
    )
    # Claimed at once (as a worker claims): the reconciler settles it if this process dies.
    record_progress(event, "accepted", 5, claimed_by)
    return event


# --- Host pressure (vms.pressure) --------------------------------------------------------------

PRESSURE = Actor.system(channel="worker", name="pressure")
PRIORITIES = ("high", "normal", "low")


def validate_priority(priority: Any) -> str:
    if priority not in PRIORITIES:
        raise ValidationError({"priority": "one of high, normal, low"})
    return str(priority)


def validate_opt_out(opt_out: Any) -> bool:
    if not isinstance(opt_out, bool):
        raise ValidationError({"pressure_opt_out": "true or false"})
    return opt_out


@transaction.atomic
def set_priority(
    caller: Caller,
    vm: VirtualMachine,
    *,
    priority: str | None = None,
    pressure_opt_out: bool | None = None,
) -> store.RecordedEvent:
    """Change the VM's priority under host pressure and/or its opt-out (None: unchanged).
    Appends vm.priority_set with both values and what they were; the control loop acts on them
    at its next look (an opted-out VM's balloon is released)."""
    row = lifecycle.verb("set_priority")
    policy.require(caller, row.name, vm.owner_id)
    if priority is None and pressure_opt_out is None:
        raise ValidationError({"priority": "give priority, pressure_opt_out or both"})
    if priority is not None:
        priority = validate_priority(priority)
    if pressure_opt_out is not None:
        pressure_opt_out = validate_opt_out(pressure_opt_out)
    store.lock()
    fresh = _fresh(vm.pk)
    if fresh.state not in row.allowed_from:
        raise InvalidState(fresh, row.name, row.allowed_from)
    return store.append(
        "vm",
        str(fresh.pk),
        "vm.priority_set",
        {
            "priority": fresh.priority if priority is None else priority,
            "pressure_opt_out": (
                fresh.pressure_opt_out if pressure_opt_out is None else pressure_opt_out
            ),
            "before": {"priority": fresh.priority, "pressure_opt_out": fresh.pressure_opt_out},
        },
        actor=caller.actor,
        expected_version=fresh.version,
    )


PRESSURE_EVENTS = frozenset(
    {"vm.ballooned", "vm.balloon_released", "vm.cpu_lowered", "vm.cpu_restored"}
)


@transaction.atomic
def record_pressure_action(
    vm_id: uuid.UUID, event_type: str, data: dict[str, Any]
) -> store.RecordedEvent:
    """What the pressure loop did to a VM's balloon or CPU weight (done: this records it), with
    the reason and the readings that made it; appended by the system, the VM's state unchanged."""
    if event_type not in PRESSURE_EVENTS:
        raise ValueError(f"not a pressure event: {event_type}")
    store.lock()
    fresh = _fresh(vm_id)
    return store.append(
        "vm", str(fresh.pk), event_type, data, actor=PRESSURE, expected_version=fresh.version
    )


def _bounded_counts(counts: dict[str, int] | None, limit: int) -> dict[str, Any]:
    items = sorted(((str(k), int(v)) for k, v in (counts or {}).items()), key=lambda i: -i[1])
    return {"counts": dict(items[:limit]), "more": max(0, len(items) - limit)}


@transaction.atomic
def record_net_evidence(
    vm_id: str,
    *,
    since: str,
    until: str,
    refused: list[dict[str, Any]] | tuple[()] = (),
    lookups_allowed: dict[str, int] | None = None,
    lookups_refused: dict[str, int] | None = None,
) -> list[store.RecordedEvent]:
    """One period's egress evidence of a VM (the worker's collector): the connections its
    policy refused (``refused``: {dst, proto, port, packets}) as net.egress_refused, and the
    names its resolver answered or refused as net.dns_lookups, each bounded to
    SANDBOX_NET_EVIDENCE_MAX_ROWS rows (the biggest) with a ``more`` count; nothing for an
    empty period."""
    limit = settings.SANDBOX_NET_EVIDENCE_MAX_ROWS
    pending = []
    if refused:
        rows = sorted(
            (
                {
                    "dst": str(r["dst"]),
                    "proto": str(r["proto"]),
                    "port": int(r["port"]) if r.get("port") is not None else None,
                    "packets": int(r["packets"]),
                }
                for r in refused
            ),
            key=lambda r: -int(r["packets"] or 0),
        )
        pending.append(
            store.PendingEvent(
                "vm",
                vm_id,
                "net.egress_refused",
                {
                    "since": since,
                    "until": until,
                    "refused": rows[:limit],
                    "more": max(0, len(rows) - limit),
                },
            )
        )
    if lookups_allowed or lookups_refused:
        allowed = _bounded_counts(lookups_allowed, limit)
        refused_names = _bounded_counts(lookups_refused, limit)
        pending.append(
            store.PendingEvent(
                "vm",
                vm_id,
                "net.dns_lookups",
                {
                    "since": since,
                    "until": until,
                    "allowed": allowed["counts"],
                    "refused": refused_names["counts"],
                    "more": allowed["more"] + refused_names["more"],
                },
            )
        )
    if not pending:
        return []
    return store.append_many(pending, actor=Actor.system(channel="worker", name="worker"))


# --- Guest access (exec, files) and console sessions --------------------------------------------

# What a guest access asks for (the guest verbs of the lifecycle table): its permission, and
# the types of its outcomes.
GUEST_ACCESS: dict[str, str] = {v.name: v.permission for v in lifecycle.GUEST_VERBS}
GUEST_OUTCOMES: dict[str, frozenset[str]] = {
    v.name: frozenset(v.outcomes()) for v in lifecycle.GUEST_VERBS
}
_GUEST_REQUESTS = {v.request_type(): v.name for v in lifecycle.GUEST_VERBS}


def require_guest_access(caller: Caller, vm: VirtualMachine, kind: str) -> None:
    """May ``caller`` do ``kind`` (exec, file_upload, file_download) in the guest of ``vm``
    now? Also checked before a request body is read, so a caller without the permission never
    has an upload parsed."""
    row = lifecycle.guest_verb(kind)
    policy.require(caller, kind, vm.owner_id)
    # A VM the system paused for idleness is resumed first (vms.idle.wake).
    if vm.state not in row.allowed_from and not lifecycle.wakes_on_activity(
        vm.state, vm.idle_paused
    ):
        raise InvalidState(vm, "reach the guest of", row.allowed_from)


@transaction.atomic(durable=True)
def request_guest_access(
    caller: Caller, vm: VirtualMachine, kind: str, data: dict[str, Any]
) -> store.RecordedEvent:
    """Check and append ``vm.<kind>_requested`` (exec, file_upload, file_download), committed
    when this returns: the guest is asked only after the log holds the request.

    Durable: inside another transaction the request would not be committed before the guest
    acts, so that is refused (RuntimeError). ``EventStoreUnavailable`` when the log cannot take
    the request: then the caller must not ask the guest anything.
    """
    row = lifecycle.guest_verb(kind)
    require_guest_access(caller, vm, kind)
    store.lock()
    # The state under the lock: a stop or destroy may have come first.
    found = _vm_state_query().run(vm=vm.pk)
    if not found:
        raise NotFound(f"no VM {vm.pk}")
    if found[0]["state"] not in row.allowed_from:
        # The whole row for the refusal: a caller reads why (an idle pause under way: vms.guest).
        raise InvalidState(_fresh(vm.pk), "reach the guest of", row.allowed_from)
    # Used from now (vms.idle): in the request's transaction, under the lock the idle pause is
    # decided under, so no pause falls between the two.
    mark_used(vm.pk, timezone.now())
    return store.append("vm", str(vm.pk), row.request_type(), data, actor=caller.actor)


class AlreadySettled(Exception):
    """The guest request has an outcome already (the reconciler settled it as interrupted)."""


def _guest_outcome_of(request: store.RecordedEvent, outcomes: frozenset[str]) -> bool:
    return bool(
        _guest_outcome_query(outcomes).run(position=request.position, request=str(request.event_id))
    )


@transaction.atomic
def record_guest_outcome(
    caller: Caller, request: store.RecordedEvent, outcome: str, data: dict[str, Any]
) -> store.RecordedEvent:
    """Append the outcome of a guest access request (completed or failed), caused by it: one
    per request (``AlreadySettled`` when the reconciler gave it one first)."""
    kind = _GUEST_REQUESTS.get(request.type)
    if kind is None or outcome not in GUEST_OUTCOMES[kind]:
        raise ValueError(f"{outcome} is not an outcome of {request.type}")
    store.lock()
    if _guest_outcome_of(request, GUEST_OUTCOMES[kind]):
        raise AlreadySettled(f"request {request.event_id} has an outcome already")
    event = store.append(
        request.aggregate_type,
        request.aggregate_id,
        outcome,
        data,
        actor=caller.actor,
        causation_id=request.event_id,
        correlation_id=request.correlation_id,
    )
    # The guest was used until now (vms.idle counts from the end of the last request), in the
    # outcome's transaction: an idle pause under the lock never sees the request answered but
    # the VM's use still dated from when it was asked.
    if (
        VirtualMachine.objects.filter(pk=request.aggregate_id)
        .exclude(state=lifecycle.GONE)
        .exists()
    ):
        # Not for a VM destroyed meanwhile: its row went with its vm.destroyed (record_outcome).
        mark_used(request.aggregate_id, event.recorded_at)
    return event


def mark_used(vm_id: uuid.UUID | str, at: datetime) -> None:
    """The VM's guest was used at ``at`` (``VMActivity``, vms.idle; one upsert)."""
    VMActivity.objects.bulk_create(
        [VMActivity(vm_id=uuid.UUID(str(vm_id)), last_at=at)],
        update_conflicts=True,
        unique_fields=["vm_id"],
        update_fields=["last_at"],
    )


@transaction.atomic
def settle_interrupted_guest_request(
    actor: Actor, request: store.RecordedEvent, data: dict[str, Any]
) -> store.RecordedEvent | None:
    """Give a guest request whose web process died before its outcome the failure outcome of
    its verb (``data`` says why), caused by it; None when it has an outcome already."""
    row = lifecycle.guest_verb(_GUEST_REQUESTS[request.type])
    store.lock()
    if _guest_outcome_of(request, GUEST_OUTCOMES[row.name]):
        return None
    return store.append(
        request.aggregate_type,
        request.aggregate_id,
        row.outcomes()[1],
        data,
        actor=actor,
        causation_id=request.event_id,
        correlation_id=request.correlation_id,
    )


@transaction.atomic
def record_console_opened(actor: Actor, vm_id: str, data: dict[str, Any]) -> store.RecordedEvent:
    """A console session starts: recorded before the websocket is accepted, so no keystroke
    reaches the guest from a session the log does not hold."""
    return store.append("vm", vm_id, "vm.console_opened", data, actor=actor)


@transaction.atomic
def record_console_closed(
    actor: Actor, vm_id: str, opened_event_id: str, data: dict[str, Any]
) -> store.RecordedEvent:
    return store.append(
        "vm",
        vm_id,
        "vm.console_closed",
        data,
        actor=actor,
        causation_id=opened_event_id,
        correlation_id=actor.request_id,
    )


# --- The worker's side ------------------------------------------------------------------------

WORKER = Actor(kind="system", username="worker", channel="worker")


def record_outcome(
    request: store.RecordedEvent, outcome: str, data: dict[str, Any] | None = None
) -> store.RecordedEvent | None:
    """Append the outcome of ``request``; None when an outcome was already recorded (a retry)."""
    actor = Actor.system(channel="worker", name="worker")
    try:
        with transaction.atomic():
            if RequestOutcome.objects.filter(request_event_id=request.event_id).exists():
                return None
            pending = [
                store.PendingEvent(
                    request.aggregate_type,
                    request.aggregate_id,
                    outcome,
                    data or {},
                    causation_id=request.event_id,
                )
            ]
            if outcome == DESTROYED:
                pending += _release_events(request.aggregate_id, request.event_id)
            recorded = store.append_many(
                pending, actor=actor, correlation_id=request.correlation_id
            )[0]
            if outcome == DESTROYED:
                # Its last use (vms.idle) is of no VM any more: not state, so no event; gone
                # with its vm.destroyed, under the append lock (a guest outcome after this
                # does not write it again: record_guest_outcome).
                VMActivity.objects.filter(vm_id=uuid.UUID(request.aggregate_id)).delete()
            return recorded
    except (IntegrityError, ConcurrencyError):
        # The unique RequestOutcome key: another attempt recorded it first.
        return None


DESTROYED = lifecycle.request_verb("destroy").succeeded


def _release_events(vm_id: str, cause: str) -> list[store.PendingEvent]:
    """What a destroyed VM gives back, appended with its ``vm.destroyed``: its port forwards
    (net.port_forward_removed) and its address (net.ip_released; free for a new VM only
    from then on)."""
    vm = VirtualMachine.objects.filter(pk=vm_id).values("ip", "network_id").first()
    if vm is None:
        return []
    out = [
        store.PendingEvent(
            "vm",
            vm_id,
            "net.port_forward_removed",
            {**_forward_data(f), "reason": "destroyed"},
            causation_id=cause,
        )
        for f in PortForward.objects.filter(vm_id=uuid.UUID(vm_id))
    ]
    if vm["ip"]:
        out.append(
            store.PendingEvent(
                "vm",
                vm_id,
                "net.ip_released",
                {"ip": vm["ip"], "network_id": str(vm["network_id"]) if vm["network_id"] else None},
                causation_id=cause,
            )
        )
    return out


class _Superseded:
    def __repr__(self) -> str:
        return "SUPERSEDED"


SUPERSEDED = _Superseded()


def _pending_request_of(request: store.RecordedEvent) -> str | None:
    found = _pending_request_query().run(vm=uuid.UUID(request.aggregate_id))
    return found[0]["pending_request"] if found else None


def is_pending(request: store.RecordedEvent) -> bool:
    """Under the append lock: is ``request`` still the request its VM waits for?

    False once a later request (a destroy: the only one that may overtake another) was
    appended, or when an outcome settled it. Only the caller's check is serialized by the lock;
    a launch that must not outlive a destroy holds the VM's host lock as well (vms.worker).
    """
    with transaction.atomic():
        store.lock()
        return _pending_request_of(request) == request.event_id


def record_outcome_if_pending(
    request: store.RecordedEvent, outcome: str, data: dict[str, Any] | None = None
) -> store.RecordedEvent | None | _Superseded:
    """Append the outcome of ``request`` if the VM still waits for it, checked under the append
    lock in the same transaction (so no destroy slips in between); else ``SUPERSEDED`` and
    nothing is appended. None, as for ``record_outcome``, when an outcome was already there."""
    with transaction.atomic():
        store.lock()
        if RequestOutcome.objects.filter(request_event_id=request.event_id).exists():
            return None
        if _pending_request_of(request) != request.event_id:
            return SUPERSEDED
        return record_outcome(request, outcome, data)


def record_progress(request: store.RecordedEvent, step: str, pct: int, message: str = "") -> None:
    store.append(
        request.aggregate_type,
        request.aggregate_id,
        "vm.progress",
        {"step": step, "pct": pct, "message": message, "request": request.event_id},
        actor=Actor.system(channel="worker", name="worker"),
        causation_id=request.event_id,
        correlation_id=request.correlation_id,
    )


def record_snapshot_created(
    request: store.RecordedEvent, snapshot_id: str, data: dict[str, Any]
) -> store.RecordedEvent:
    """The worker took a snapshot: its files and manifest (the snapshot aggregate's first
    event), caused by the VM's snapshot request."""
    return store.append(
        "snapshot",
        snapshot_id,
        "snapshot.created",
        data,
        actor=Actor.system(channel="worker", name="worker"),
        causation_id=request.event_id,
        correlation_id=request.correlation_id,
        expected_version=0,
    )


AGENT_CREDENTIAL_REASONS = frozenset({"enrolled", "restored", "cloned", "requested", "handed_out"})


def record_agent_credential_rotated(
    vm_id: str,
    reason: str,
    *,
    actor: Actor | None = None,
    request: store.RecordedEvent | None = None,
    key_id: str = "",
) -> store.RecordedEvent:
    """The VM's guest agent was given a new credential (``vms.agent.credentials``): why
    (``reason``: enrolled after a boot, restored, cloned, requested) and the id of the key its
    stored copy is encrypted under. Never the value, nor anything derived from it."""
    if reason not in AGENT_CREDENTIAL_REASONS:
        raise ValueError(f"unknown agent credential rotation reason {reason!r}")
    return store.append(
        "vm",
        vm_id,
        "vm.agent_credential_rotated",
        {"reason": reason, "key_id": key_id},
        actor=actor or Actor.system(channel="worker", name="worker"),
        causation_id=request.event_id if request is not None else "",
        correlation_id=request.correlation_id if request is not None else "",
    )


def record_snapshot_corrupted(
    request: store.RecordedEvent, snapshot_id: str, reason: str
) -> store.RecordedEvent:
    """A snapshot failed its manifest check before a restore that ``request`` asked for."""
    return store.append(
        "snapshot",
        snapshot_id,
        "snapshot.corrupted",
        {"reason": reason},
        actor=Actor.system(channel="worker", name="worker"),
        causation_id=request.event_id,
    )


def record_crashed(vm_id: str, data: dict[str, Any], *, actor: Actor) -> store.RecordedEvent:
    """The reconciler found a running or paused VM's VMM gone."""
    return store.append("vm", vm_id, "vm.crashed", data, actor=actor)


# --- Preview links (shareable signed URLs to a guest's port; see vms.previews) ----------------


@transaction.atomic
def create_preview_link(
    caller: Caller, vm: VirtualMachine, port: int, seconds: int
) -> previews.Grant:
    """A shareable grant to ``port`` of ``vm`` for ``seconds``, recorded as
    ``vm.preview_link_created`` (with its id and expiry, never the signed value: that is the
    credential). Only links are recorded: the dashboard's own hand-off is the user viewing."""
    policy.require(caller, "share_preview", vm.owner_id)
    if vm.state == lifecycle.GONE:
        raise NotFound(f"no VM {vm.pk}")
    if not previews.port_allowed(port):
        raise ValidationError({"port": "this port may not be previewed"})
    if not 1 <= seconds <= settings.SANDBOX_PREVIEW_LINK_MAX_S:
        raise ValidationError(
            {"expires_in": f"between 1 and {settings.SANDBOX_PREVIEW_LINK_MAX_S} seconds"}
        )
    grant = previews.issue(vm, port, caller.user.pk, previews.LINK, seconds)
    store.append(
        "vm",
        str(vm.pk),
        "vm.preview_link_created",
        {"link_id": grant.link_id, "port": port, "expires": grant.expires},
        actor=caller.actor,
    )
    return grant


@transaction.atomic
def revoke_preview_links(
    caller: Caller, vm: VirtualMachine, link_id: str | None = None
) -> list[str]:
    """Revoke one shareable link of ``vm`` (``link_id``), or every one still open (None): whoever
    holds it, or the cookie it turned into, is refused from then on. Appends one
    ``vm.preview_link_revoked`` naming the links; revoking nothing appends nothing. Returns the
    revoked link ids."""
    policy.require(caller, "revoke_preview", vm.owner_id)
    store.lock()
    links = PreviewLink.objects.filter(vm_id=vm.pk)
    if link_id is not None:
        link = links.filter(link_id=link_id).first()
        if link is None:
            raise NotFound(f"no preview link {link_id} of VM {vm.pk}")
        if link.revoked_at is not None:
            raise ValidationError({"link_id": "this link is already revoked"})
        ids = [link.link_id]
    else:
        open_links = links.filter(revoked_at__isnull=True, expires_at__gt=timezone.now())
        ids = sorted(open_links.values_list("link_id", flat=True))
    if ids:
        store.append(
            "vm", str(vm.pk), "vm.preview_link_revoked", {"link_ids": ids}, actor=caller.actor
        )
    return ids


# --- Quotas and team budgets ------------------------------------------------------------------

QUOTA_MAX = 2_147_483_647  # PositiveIntegerField's range


def _clean_limits(limits: Mapping[str, Any]) -> dict[str, int | None]:
    """Every resource's limit (a whole number, or None: inherit, or for a budget no team
    limit); a resource left out is None. Unknown names and bad values: field errors."""
    errors: dict[str, str] = {}
    for key in sorted(set(limits) - set(quotas.RESOURCES)):
        errors[key] = f"not a quota resource (one of {', '.join(quotas.RESOURCES)})"
    out: dict[str, int | None] = {}
    for r in quotas.RESOURCES:
        value = limits.get(r)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= QUOTA_MAX
        ):
            errors[r] = f"must be empty or a whole number from 0 to {QUOTA_MAX}"
        out[r] = value
    if errors:
        raise ValidationError(errors)
    return out


def _limits_of(row: Quota | GroupBudget | None) -> dict[str, int | None]:
    return {r: (getattr(row, f"max_{r}") if row is not None else None) for r in quotas.RESOURCES}


def _change_limits(
    caller: Caller,
    scope: str,
    rows: Any,
    owner: dict[str, Any],
    names: dict[str, Any],
    limits: Mapping[str, Any],
) -> dict[str, int | None]:
    """Replace the limits of one quota or budget row (``rows``: its model's rows filtered to the
    target; ``owner``: the field a new row is made with; ``names``: the target's id and name,
    for the event, whose aggregate is ``<scope>:<id>``): the row and a
    ``quota.changed`` event, with the limits before and after, in one transaction under the
    append lock, so concurrent changes and the creates they limit are serialised. All limits
    empty removes the row. No change, no event."""
    policy.require_quota_admin(caller)
    after = _clean_limits(limits)
    store.lock()
    row = rows.first()
    before = _limits_of(row)
    if before == after:
        return after
    fields = {f"max_{r}": v for r, v in after.items()}
    if all(v is None for v in after.values()):
        rows.delete()
    elif row is None:
        rows.model.objects.create(**owner, **fields)
    else:
        rows.update(**fields)
    store.append(
        "quota",
        f"{scope}:{next(iter(names.values()))}",
        "quota.changed",
        {"scope": scope, **names, "before": before, "after": after},
        actor=caller.actor,
    )
    return after


@transaction.atomic
def set_quota(
    caller: Caller, *, user: Any = None, group: Any = None, limits: Mapping[str, Any]
) -> dict[str, int | None]:
    """Set the quota of ``user`` or (an allowance for each member) of ``group``: every resource
    at once, an empty one inheriting (``vms.quotas.effective_quota``). Needs
    ``vms.change_quota``; returns the limits now in force at that level."""
    if (user is None) == (group is None):
        raise TypeError("set_quota takes a user or a group")
    if user is not None:
        return _change_limits(
            caller,
            "user",
            Quota.objects.filter(user=user),
            {"user": user},
            {"user_id": user.pk, "username": user.username},
            limits,
        )
    return _change_limits(
        caller,
        "group",
        Quota.objects.filter(group=group),
        {"group": group},
        {"group_id": group.pk, "group": group.name},
        limits,
    )


@transaction.atomic
def set_group_budget(
    caller: Caller, group: Any, limits: Mapping[str, Any]
) -> dict[str, int | None]:
    """Set the team budget of ``group``: what the VMs drawing from it hold together (an empty
    resource: no team limit; all empty removes the budget). Needs ``vms.change_quota``. VMs
    already created stay charged where they were: a new budget counts the VMs created after it."""
    return _change_limits(
        caller,
        "budget",
        GroupBudget.objects.filter(group=group),
        {"group": group},
        {"group_id": group.pk, "group": group.name},
        limits,
    )


# --- Warm pools (vms.pools) -----------------------------------------------------------------

POOL_SYSTEM = Actor.system(channel="system", name="pools")
POOL_TARGET_MAX = 64


def pool_targets() -> dict[str, int]:
    """Every template's pool target: ``SANDBOX_POOLS``, overridden by what admins set."""
    targets = dict(settings.SANDBOX_POOLS)
    targets.update(PoolTarget.objects.values_list("template", "target"))
    return targets


def pool_memory_used() -> int:
    """Guest memory (MiB) all pool members of every host take: what the pool budget counts."""
    return PoolMember.objects.aggregate(m=Sum("memory_mib"))["m"] or 0


@transaction.atomic
def set_pool_target(caller: Caller, template: str, target: Any) -> store.RecordedEvent:
    """Set ``template``'s warm pool target (admins; ``pool.target_set``); the refill follows
    on commit (a lower target evicts the members over it)."""
    policy.require_pool_admin(caller)
    if not Template.objects.filter(name=template).exists():
        raise NotFound(f"no template {template!r}")
    if isinstance(target, bool) or not isinstance(target, int):
        raise ValidationError({"target": "a whole number of VMs"})
    if not 0 <= target <= POOL_TARGET_MAX:
        raise ValidationError({"target": f"from 0 to {POOL_TARGET_MAX}"})
    store.lock()
    before = pool_targets().get(template, 0)
    event = store.append(
        "pool",
        f"target:{template}",
        "pool.target_set",
        {"template": template, "target": target, "before": before},
        actor=caller.actor,
    )
    transaction.on_commit(enqueue.pool_refill)
    return event


@transaction.atomic
def record_pool_warming(tpl: Template, host: str, image_id: str) -> uuid.UUID | None:
    """A new member of ``tpl``'s pool on ``host``, counted from now (``pool.vm_warming``); None
    when the template's pool on this host is at its target or the budget has no room (checked
    under the append lock: concurrent refills on other hosts see each other's members)."""
    store.lock()
    target = pool_targets().get(tpl.name, 0)
    have = PoolMember.objects.filter(template=tpl.name, host=host).count()
    if have >= target:
        return None
    if pool_memory_used() + tpl.memory_mib > settings.SANDBOX_POOL_BUDGET_MIB:
        return None
    member_id = uuid.uuid4()
    store.append(
        "pool",
        str(member_id),
        "pool.vm_warming",
        {
            "template": tpl.name,
            "host": host,
            "vcpus": tpl.vcpus,
            "memory_mib": tpl.memory_mib,
            "disk_mib": tpl.disk_mib,
            "image_id": image_id,
            "target": target,
        },
        actor=POOL_SYSTEM,
        expected_version=0,
    )
    return member_id


def record_pool_warmed(member_id: uuid.UUID, data: dict[str, Any]) -> store.RecordedEvent:
    return store.append(
        "pool", str(member_id), "pool.vm_warmed", data, actor=POOL_SYSTEM, expected_version=1
    )


@transaction.atomic
def record_pool_evicted(
    member_id: uuid.UUID, reason: str, *, handed_out_vm: uuid.UUID | None = None
) -> store.RecordedEvent | None:
    """``pool.vm_evicted``: a member leaves its pool (before its VMM is torn down, so no create
    can take it meanwhile); None when it is no longer in the pool (handed out or evicted by
    another). ``handed_out_vm``: a hand-out that failed after the member was given to that VM
    (the VM then starts the ordinary way)."""
    store.lock()
    if handed_out_vm is not None:
        version, data = store.ANY_VERSION, {"vm_id": str(handed_out_vm)}
    else:
        member = PoolMember.objects.filter(pk=member_id).first()
        if member is None:
            return None
        version = POOL_READY_VERSION if member.state == PoolMember.State.READY else 1
        data = {"template": member.template, "host": member.host, "state": member.state}
    return store.append(
        "pool",
        str(member_id),
        "pool.vm_evicted",
        {**data, "reason": reason[:2000]},
        actor=POOL_SYSTEM,
        expected_version=version,
    )


def record_handout(
    request: store.RecordedEvent, key_id: str, data: dict[str, Any]
) -> store.RecordedEvent | None | _Superseded:
    """A handed-out pool member runs as its VM: its own agent credential
    (``vm.agent_credential_rotated``, reason handed_out) and the start request's outcome
    (``vm.started`` with ``from_pool``), in one append, if the VM still waits for the start."""
    actor = Actor.system(channel="web", name="pools")
    with transaction.atomic():
        store.lock()
        if _pending_request_of(request) != request.event_id:
            return SUPERSEDED
        try:
            with transaction.atomic():
                return store.append_many(
                    [
                        store.PendingEvent(
                            "vm",
                            request.aggregate_id,
                            "vm.agent_credential_rotated",
                            {"reason": "handed_out", "key_id": key_id},
                            causation_id=request.event_id,
                        ),
                        store.PendingEvent(
                            "vm",
                            request.aggregate_id,
                            _STARTED,
                            data,
                            causation_id=request.event_id,
                        ),
                    ],
                    actor=actor,
                    correlation_id=request.correlation_id,
                )[-1]
        except (IntegrityError, ConcurrencyError):
            return None


_STARTED = str(lifecycle.request_verb("start").succeeded)
