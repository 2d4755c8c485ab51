"""Every VM action: one function per verb.

Each checks permission, ownership, state and quota against the projections and appends the
request event, in one transaction taken under the event store's append lock (so concurrent
requests are checked one after the other). The worker task that carries the request out is
enqueued on commit; it appends the outcome through ``record_outcome``. Views, consumers and tasks
never write VM events or read-model rows themselves.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.db.models import QuerySet

from accounts.caller import Caller
from audit import store
from audit.actor import Actor
from audit.errors import ConcurrencyError
from core.compiled import CompiledQuery, cached
from vms import identity, quotas
from vms.models import RequestOutcome, Snapshot, Template, VirtualMachine, VMState

__all__ = [
    "Accepted",
    "Busy",
    "InvalidState",
    "NotFound",
    "SUPERSEDED",
    "clone",
    "create",
    "delete_snapshot",
    "destroy",
    "is_pending",
    "pause",
    "reboot",
    "GUEST_ACCESS",
    "may_act_on",
    "record_console_closed",
    "record_console_opened",
    "record_crashed",
    "record_guest_outcome",
    "record_snapshot_corrupted",
    "record_snapshot_created",
    "request_guest_access",
    "require_guest_access",
    "sees_all_vms",
    "record_outcome",
    "record_outcome_if_pending",
    "record_progress",
    "resize",
    "restore",
    "resume",
    "snapshot",
    "start",
    "stop",
    "visible_snapshots",
    "visible_vms",
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

    @cached_property
    def vm(self) -> VirtualMachine:
        """The VM as the projection has it, read when first asked for: after the command's
        transaction, so not while it holds the event store's lock."""
        return _fresh(self.vm_id)


# verb -> (permission, states it may start from)
RULES: dict[str, tuple[str, frozenset[str]]] = {
    "start": ("vms.operate_vm", frozenset({"stopped", "failed", "crashed"})),
    "stop": ("vms.operate_vm", frozenset({"running", "paused", "failed", "crashed"})),
    "reboot": ("vms.operate_vm", frozenset({"running"})),
    "pause": ("vms.operate_vm", frozenset({"running"})),
    "resume": ("vms.operate_vm", frozenset({"paused"})),
    "resize": ("vms.operate_vm", frozenset({"running", "stopped"})),
    "snapshot": ("vms.snapshot_vm", frozenset({"running", "paused"})),
    "restore": (
        "vms.rollback_snapshot",
        frozenset({"running", "paused", "stopped", "failed", "crashed"}),
    ),
    "destroy": ("vms.delete_virtualmachine", frozenset(s.value for s in VMState) - {"destroyed"}),
}


# --- Visibility -------------------------------------------------------------------------------


def sees_all_vms(caller: Caller) -> bool:
    """Readers of all (viewer, auditor, admin) see everyone's VMs; operators their own.

    Asked of the caller, not the user: an API token reaches other users' VMs only if its scopes
    hold the permission that grants it (a view permission, or ``vms.manage_all_vms``)."""
    return caller.has("vms.view_virtualmachine") or caller.has("vms.manage_all_vms")


def may_act_on(caller: Caller, owner_id: int | None) -> bool:
    """May ``caller`` act on a VM or snapshot of ``owner_id``: its own, or any with
    ``vms.manage_all_vms`` (held by the user and, for a scoped token, among its scopes)."""
    return owner_id == caller.user.pk or caller.has("vms.manage_all_vms")


def visible_vms(caller: Caller) -> QuerySet[VirtualMachine]:
    qs = VirtualMachine.objects.select_related("owner")
    if sees_all_vms(caller):
        return qs
    return qs.filter(owner=caller.user)


def visible_snapshots(caller: Caller) -> QuerySet[Snapshot]:
    qs = Snapshot.objects.select_related("owner", "vm")
    if caller.has("vms.view_snapshot") or caller.has("vms.manage_all_vms"):
        return qs
    return qs.filter(owner=caller.user)


def _own_or_admin(caller: Caller, owner_id: int) -> None:
    if not may_act_on(caller, owner_id):
        raise PermissionDenied("you may only act on your own VMs")


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
    perm, allowed = RULES[verb]
    caller.require(perm)
    _own_or_admin(caller, vm.owner_id)
    store.lock()
    if not read_under_lock:
        vm = _fresh(vm.pk)  # re-read under the lock: the state another request left
    if vm.busy and verb != "destroy":
        raise Busy(vm, verb)
    if vm.state not in allowed:
        raise InvalidState(vm, verb, allowed)
    event = store.append(
        "vm",
        str(vm.pk),
        f"vm.{verb}_requested",
        data or {},
        actor=caller.actor,
        expected_version=vm.version,
    )
    _enqueue_on_commit(event)
    return vm.pk, event


def _enqueue_on_commit(event: store.RecordedEvent) -> None:
    from vms import tasks

    transaction.on_commit(lambda: tasks.enqueue(event.event_id))


@transaction.atomic
def start(caller: Caller, vm: VirtualMachine) -> Accepted:
    return Accepted(*_request(caller, vm, "start"))


@transaction.atomic
def stop(
    caller: Caller, vm: VirtualMachine, *, force: bool = False, grace_s: int | None = None
) -> Accepted:
    grace = settings.SANDBOX_STOP_GRACE_S if grace_s is None else grace_s
    if not 0 <= grace <= 600:
        raise ValidationError({"grace_s": "must be between 0 and 600 seconds"})
    return Accepted(*_request(caller, vm, "stop", {"force": force, "grace_s": grace}))


@transaction.atomic
def reboot(caller: Caller, vm: VirtualMachine) -> Accepted:
    return Accepted(*_request(caller, vm, "reboot"))


@transaction.atomic
def pause(caller: Caller, vm: VirtualMachine) -> Accepted:
    return Accepted(*_request(caller, vm, "pause"))


@transaction.atomic
def resume(caller: Caller, vm: VirtualMachine) -> Accepted:
    return Accepted(*_request(caller, vm, "resume"))


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
    _own_or_admin(caller, fresh.owner_id)
    quotas.check(fresh.owner, quota=limits, snapshots=1)
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
    _check_snapshot_usable(caller, snap)
    if snap.vm_id != vm.pk:
        raise ValidationError(
            {"snapshot": "restore in place takes a snapshot of this VM; clone others"}
        )
    return Accepted(*_request(caller, vm, "restore", {"snapshot_id": str(snap.pk)}), snapshot=snap)


@transaction.atomic
def destroy(caller: Caller, vm: VirtualMachine) -> Accepted:
    return Accepted(*_request(caller, vm, "destroy"))


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


OWNER_STAND_IN = -7_319_446_583
NAME_STAND_IN = "stand-in-vm-name"


@cached
def _name_taken_query() -> CompiledQuery:
    """One of the owner's live VMs with this name, if any (runs under the lock: compiled)."""
    qs = VirtualMachine.objects.filter(owner_id=OWNER_STAND_IN, name=NAME_STAND_IN)
    return CompiledQuery(
        qs.exclude(state="destroyed").values("id")[:1],
        {"owner": OWNER_STAND_IN, "name": NAME_STAND_IN},
    )


def _new_vm_events(
    caller: Caller,
    *,
    name: str,
    template: Template | Snapshot,
    vcpus: int,
    memory_mib: int,
    disk_mib: int,
    source_snapshot: Snapshot | None,
    request: tuple[str, dict[str, Any]] | None = None,
) -> tuple[uuid.UUID, list[store.RecordedEvent]]:
    """Take the lock, check the name and the quotas, append vm.created and ``request`` (the
    type and data of the new VM's first request, if any) in one append: (new id, events).

    The quota definitions are read before the lock, which is then held only for what
    concurrent requests change (usage, names, addresses) and the append.
    """
    limits = quotas.effective_quota(caller.user)
    store.lock()
    vm_id = uuid.uuid4()
    if _name_taken_query().run(owner=caller.user.pk, name=name):
        raise ValidationError({"name": f"you already have a VM named {name!r}"})
    quotas.check(
        caller.user, quota=limits, vms=1, vcpus=vcpus, memory_mib=memory_mib, disk_mib=disk_mib
    )
    mac, ip = identity.allocate()
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
        },
        expected_version=0,
    )
    pending = [created]
    if request is not None:
        # The same append: one head read, one INSERT, one projection pass for both events.
        pending.append(store.PendingEvent("vm", str(vm_id), *request, expected_version=1))
    return vm_id, store.append_many(pending, actor=caller.actor)


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
) -> Accepted:
    caller.require("vms.add_virtualmachine")
    name = _validate_name(name, "name")
    tpl = Template.objects.filter(name=template, enabled=True).first()
    if tpl is None:
        raise ValidationError({"template": f"no enabled template named {template!r}"})
    shape = (vcpus or tpl.vcpus, memory_mib or tpl.memory_mib, disk_mib or tpl.disk_mib)
    _validate_shape(*shape)
    vm_id, events = _new_vm_events(
        caller,
        name=name,
        template=tpl,
        vcpus=shape[0],
        memory_mib=shape[1],
        disk_mib=shape[2],
        source_snapshot=None,
        request=("vm.start_requested", {}) if start_now else None,
    )
    if not start_now:
        return Accepted(vm_id, events[0])
    _enqueue_on_commit(events[1])
    return Accepted(vm_id, events[1])


def _check_snapshot_usable(caller: Caller, snap: Snapshot) -> None:
    caller.require("vms.rollback_snapshot")
    _own_or_admin(caller, snap.owner_id)
    if snap.state != Snapshot.State.READY:
        raise ValidationError({"snapshot": f"the snapshot is {snap.state}, not ready"})


@transaction.atomic
def clone(caller: Caller, snap: Snapshot, *, name: str) -> Accepted:
    """A new VM, with its own identity, started from ``snap``."""
    caller.require("vms.add_virtualmachine")
    _check_snapshot_usable(caller, snap)
    name = _validate_name(name, "name")
    vm_id, events = _new_vm_events(
        caller,
        name=name,
        template=snap,
        vcpus=snap.vcpus,
        memory_mib=snap.memory_mib,
        disk_mib=snap.disk_mib,
        source_snapshot=snap,
        request=("vm.restore_requested", {"snapshot_id": str(snap.pk), "clone": True}),
    )
    _enqueue_on_commit(events[1])
    return Accepted(vm_id, events[1], snap)


@transaction.atomic
def delete_snapshot(
    caller: Caller, snap: Snapshot, *, reason: str = "user", enforce_permissions: bool = True
) -> store.RecordedEvent:
    """Delete a snapshot (its files go; its record stays). Retention passes
    ``enforce_permissions=False``: the policy, not a user, decides."""
    if enforce_permissions:
        caller.require("vms.snapshot_vm")
        _own_or_admin(caller, snap.owner_id)
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
    from vms import tasks

    transaction.on_commit(lambda: tasks.enqueue_snapshot_cleanup(str(snap.pk)))
    return event


# --- Guest access (exec, files) and console sessions --------------------------------------------

# What a guest access asks for: its permission, and the types of its request and outcomes.
GUEST_ACCESS: dict[str, str] = {
    "exec": "vms.exec_vm",
    "file_upload": "vms.write_files",
    "file_download": "vms.read_files",
}
GUEST_OUTCOMES: dict[str, frozenset[str]] = {
    "exec": frozenset({"vm.exec_completed", "vm.exec_failed"}),
    "file_upload": frozenset({"vm.file_uploaded", "vm.file_upload_failed"}),
    "file_download": frozenset({"vm.file_downloaded", "vm.file_download_failed"}),
}
_GUEST_REQUESTS = {f"vm.{kind}_requested": kind for kind in GUEST_ACCESS}


def require_guest_access(caller: Caller, vm: VirtualMachine, perm: str) -> None:
    """May ``caller`` use ``perm`` on the guest of ``vm`` now? Also checked before a request
    body is read, so a caller without the permission never has an upload parsed."""
    caller.require(perm)
    _own_or_admin(caller, vm.owner_id)
    if vm.state != "running":
        raise InvalidState(vm, "reach the guest of", frozenset({"running"}))


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
    require_guest_access(caller, vm, GUEST_ACCESS[kind])
    store.lock()
    fresh = _fresh(vm.pk)  # the state under the lock: a stop or destroy may have come first
    if fresh.state != "running":
        raise InvalidState(fresh, "reach the guest of", frozenset({"running"}))
    return store.append("vm", str(vm.pk), f"vm.{kind}_requested", data, actor=caller.actor)


@transaction.atomic
def record_guest_outcome(
    caller: Caller, request: store.RecordedEvent, outcome: str, data: dict[str, Any]
) -> store.RecordedEvent:
    """Append the outcome of a guest access request (completed or failed), caused by it."""
    kind = _GUEST_REQUESTS.get(request.type)
    if kind is None or outcome not in GUEST_OUTCOMES[kind]:
        raise ValueError(f"{outcome} is not an outcome of {request.type}")
    return store.append(
        request.aggregate_type,
        request.aggregate_id,
        outcome,
        data,
        actor=caller.actor,
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
            return store.append(
                request.aggregate_type,
                request.aggregate_id,
                outcome,
                data or {},
                actor=actor,
                causation_id=request.event_id,
                correlation_id=request.correlation_id,
            )
    except (IntegrityError, ConcurrencyError):
        # The unique RequestOutcome key: another attempt recorded it first.
        return None


class _Superseded:
    def __repr__(self) -> str:
        return "SUPERSEDED"


SUPERSEDED = _Superseded()


def _pending_request_of(request: store.RecordedEvent) -> str | None:
    return (
        VirtualMachine.objects.filter(pk=request.aggregate_id)
        .values_list("pending_request", flat=True)
        .first()
    )


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
