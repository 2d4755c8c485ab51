"""Who may see and change which webhook subscription, and which events a subscription carries.

Subscriptions: a user with ``webhooks.add_subscription`` (operators, auditors, admins) keeps
subscriptions of its own and changes or deletes them with ``change_subscription`` and
``delete_subscription``; ``view_subscription`` (auditors) shows every user's, and
``manage_all_subscriptions`` (admins) acts on every user's. One the caller may not see looks
like a missing one. Letting a subscription reach loopback or private addresses takes
``allow_private_targets`` (admins). Viewers hold none of these: a subscription sends data out of
the product, which is more than watching it.

Events: a subscription delivers as its owner, asked again at every delivery (``reader``,
``may_read``): the owner must still be active and still hold ``add_subscription``, and may read
the event as the API would let it: everything with ``audit.view_audit_trail`` (auditors,
admins: the whole trail); otherwise the events of the VMs it may see (``vms.policy``: an
operator its own VMs and their snapshots) and of its own subscriptions. A subscription made
with a scoped API token stays narrowed by that token's scopes.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet

from accounts.caller import Caller
from accounts.models import APIToken
from accounts.scopes import VM_READ
from audit.actor import Actor
from audit.events import RecordedEvent
from core.scopes import Needs, needs
from vms import policy as vm_policy
from vms.models import Snapshot, VirtualMachine
from webhooks.models import Subscription

__all__ = [
    "ALLOW_PRIVATE",
    "AUDIT_ALL",
    "CHANGE",
    "DELETE",
    "MANAGE_ALL",
    "SUBSCRIBE",
    "SUBSCRIPTION_READ",
    "VIEW_ALL",
    "EventScope",
    "event_scopes",
    "may_act_on",
    "may_read",
    "reader",
    "readable_aggregates",
    "require",
    "visible_subscriptions",
]

SUBSCRIBE = "webhooks.add_subscription"
CHANGE = "webhooks.change_subscription"
DELETE = "webhooks.delete_subscription"
VIEW_ALL = "webhooks.view_subscription"
MANAGE_ALL = "webhooks.manage_all_subscriptions"
ALLOW_PRIVATE = "webhooks.allow_private_targets"
AUDIT_ALL = "audit.view_audit_trail"
SUBSCRIPTION_READ: Needs = needs(VIEW_ALL, SUBSCRIBE, CHANGE, DELETE, MANAGE_ALL)
# The aggregates whose events a reader without the audit trail may get (its VMs', its own
# subscriptions').
VM_AGGREGATES = frozenset({"vm", "snapshot"})
OWN_AGGREGATES = frozenset({"webhook"})


def visible_subscriptions(caller: Caller) -> QuerySet[Subscription]:
    qs = Subscription.objects.select_related("owner")
    if caller.has(VIEW_ALL) or caller.has(MANAGE_ALL):
        return qs
    if not any(caller.has(p) for p in SUBSCRIPTION_READ.as_list()):
        return qs.none()
    return qs.filter(owner_id=caller.user.pk)


def may_act_on(caller: Caller, subscription: Subscription) -> bool:
    return subscription.owner_id == caller.user.pk or caller.has(MANAGE_ALL)


def require(caller: Caller, perm: str, subscription: Subscription | None = None) -> None:
    """PermissionDenied unless ``caller`` holds ``perm`` (and, for a subscription, owns it or
    may manage all)."""
    caller.require(perm)
    if subscription is not None and not may_act_on(caller, subscription):
        raise PermissionDenied("you may only act on your own webhook subscriptions")


def readable_aggregates(caller: Caller) -> frozenset[str] | None:
    """The aggregates whose events ``caller`` may ever receive (None: every one)."""
    if caller.has(AUDIT_ALL):
        return None
    vm = VM_AGGREGATES if any(caller.has(p) for p in VM_READ.as_list()) else frozenset()
    return vm | OWN_AGGREGATES


# --- Delivery time ------------------------------------------------------------------------------


def reader(subscription: Subscription, user: Any | None = None) -> Caller | None:
    """The owner of ``subscription`` as it stands now, narrowed as the subscription was made;
    None when it may no longer subscribe (deactivated, or its role lost the permission)."""
    user = user if user is not None else subscription.owner
    if not getattr(user, "is_active", False):
        return None
    token = APIToken(scopes=list(subscription.scopes)) if subscription.scopes else None
    caller = Caller(user=user, token=token, actor=Actor.system(channel="worker", name="webhooks"))
    return caller if caller.has(SUBSCRIBE) else None


@dataclass(frozen=True, slots=True)
class EventScope:
    """What an event is about, for filters and permissions: its VM and that VM's owner."""

    vm_id: str | None = None
    owner_id: int | None = None
    owner_name: str = ""


def _uuid(value: str) -> uuid.UUID | None:
    with contextlib.suppress(ValueError):
        return uuid.UUID(value)
    return None


def event_scopes(events: Iterable[RecordedEvent]) -> dict[int, EventScope]:
    """Each event's scope, by position (two queries for a batch)."""
    events = list(events)
    snapshot_ids = {
        u for e in events if e.aggregate_type == "snapshot" and (u := _uuid(e.aggregate_id))
    }
    snap_vm = {
        str(pk): str(vm_id)
        for pk, vm_id in Snapshot.objects.filter(pk__in=snapshot_ids).values_list("pk", "vm_id")
        if vm_id
    }
    vm_ids = {e.aggregate_id for e in events if e.aggregate_type == "vm"} | set(snap_vm.values())
    vm_uuids = [u for v in vm_ids if (u := _uuid(v))]
    rows = VirtualMachine.objects.filter(pk__in=vm_uuids).values_list(
        "pk", "owner_id", "owner__username"
    )
    owners = {str(pk): (owner_id, username) for pk, owner_id, username in rows}
    out: dict[int, EventScope] = {}
    for e in events:
        vm_id = e.aggregate_id if e.aggregate_type == "vm" else snap_vm.get(e.aggregate_id)
        if vm_id is None:
            out[e.position] = EventScope()
            continue
        owner_id, name = owners.get(vm_id, (None, ""))
        out[e.position] = EventScope(vm_id, owner_id, name or "")
    return out


def may_read(caller: Caller, event: RecordedEvent, scope: EventScope) -> bool:
    """May the subscriber ``caller`` (from ``reader``) receive ``event``?"""
    if caller.has(AUDIT_ALL):
        return True
    if event.aggregate_type in VM_AGGREGATES:
        if scope.vm_id is None or not any(caller.has(p) for p in VM_READ.as_list()):
            return False
        return vm_policy.may_see(caller, scope.owner_id)
    if event.aggregate_type in OWN_AGGREGATES:
        return event.data.get("owner") == caller.user.username
    return False
