"""Who may do what to which VM: the one place that decides it.

Two questions, asked of a ``Caller`` (a user, maybe through an API token whose scopes narrow it):

- may it *see* a VM or snapshot? Its own always; everyone's with a view permission
  (viewer, auditor, admin) or ``vms.manage_all_vms``. Another user's VM that the caller may not
  see looks exactly like a missing one (404), wherever it is asked for.
- may it *do* a verb to one? The verb's permissions (from the lifecycle table, ``vms.lifecycle``)
  and ownership: its own VM, or any with ``vms.manage_all_vms``. For a scoped token both the
  permission and the widener must be among its scopes (``Caller.has``).

The state a verb needs is not policy: the commands check it under the event store's lock.
The API, the dashboard, the websocket consumers, the console and guest access all ask here.
"""

from __future__ import annotations

from typing import Any, Literal

from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet

from accounts.caller import Caller
from accounts.scopes import Needs, needs
from vms import lifecycle
from vms.models import Snapshot, VirtualMachine

__all__ = [
    "MANAGE_ALL",
    "NETWORK_PERMISSIONS",
    "QUOTA_PERMISSIONS",
    "may_manage_networks",
    "may_manage_quotas",
    "console_mode",
    "may",
    "may_act_on",
    "may_create",
    "may_see",
    "may_see_usage_of_user",
    "may_see_usage_rollups",
    "require",
    "require_network_admin",
    "require_quota_admin",
    "scope_of",
    "sees_all_snapshots",
    "sees_all_vms",
    "visible_snapshots",
    "vms_seen",
    "visible_vms",
]

MANAGE_ALL = "vms.manage_all_vms"
NOT_YOURS = "you may only act on your own VMs"


# --- Seeing -----------------------------------------------------------------------------------


def sees_all_vms(caller: Caller) -> bool:
    """Readers of all (viewer, auditor, admin) see everyone's VMs; operators their own.

    Asked of the caller, not the user: an API token reaches other users' VMs only if its scopes
    hold the permission that grants it (a view permission, or ``vms.manage_all_vms``)."""
    return caller.has("vms.view_virtualmachine") or caller.has(MANAGE_ALL)


def sees_all_snapshots(caller: Caller) -> bool:
    return caller.has("vms.view_snapshot") or caller.has(MANAGE_ALL)


def may_see(caller: Caller, owner_id: int | None, *, sees_all: bool | None = None) -> bool:
    """May ``caller`` see a VM of ``owner_id``? ``sees_all``: ``sees_all_vms(caller)`` when the
    caller already asked it (a websocket asks once, then filters every pushed VM)."""
    if owner_id is not None and owner_id == caller.user.pk:
        return True
    return sees_all_vms(caller) if sees_all is None else sees_all


def vms_seen(sees_all: bool, user_id: Any) -> QuerySet[VirtualMachine]:
    """The VMs seen by a caller who ``sees_all`` or else is user ``user_id``: the one owner rule,
    shared by ``visible_vms`` and the API's compiled reads (which pass a stand-in for the id)."""
    qs = VirtualMachine.objects.all()
    return qs if sees_all else qs.filter(owner_id=user_id)


def visible_vms(caller: Caller) -> QuerySet[VirtualMachine]:
    return vms_seen(sees_all_vms(caller), caller.user.pk).select_related("owner")


def visible_snapshots(caller: Caller) -> QuerySet[Snapshot]:
    qs = Snapshot.objects.select_related("owner", "vm")
    if sees_all_snapshots(caller):
        return qs
    return qs.filter(owner=caller.user)


def may_see_usage_of_user(caller: Caller, user_id: int) -> bool:
    """A user's usage history (all its VMs) is for itself and for readers of all VMs; to anyone
    else the user is not there (404), as its VMs are not."""
    return may_see(caller, user_id)


def usage_vms_of_user(caller: Caller, user_id: int) -> QuerySet[VirtualMachine] | None:
    """Every VM of user ``user_id`` (destroyed ones too: their history stays), for its usage
    roll-up; None when the caller may not see that user's usage."""
    if not may_see_usage_of_user(caller, user_id):
        return None
    return VirtualMachine.objects.filter(owner_id=user_id)


def may_see_usage_rollups(caller: Caller) -> bool:
    """A group's or a host's usage sums other users' VMs: readers of all VMs only."""
    return sees_all_vms(caller)


def usage_vms_of_group(caller: Caller, group_id: int) -> QuerySet[VirtualMachine] | None:
    """Every VM of the members of group ``group_id``, for its usage roll-up; None when the
    caller may not see roll-ups."""
    if not may_see_usage_rollups(caller):
        return None
    return VirtualMachine.objects.filter(owner__groups=group_id)


# --- Acting -----------------------------------------------------------------------------------


def may_act_on(caller: Caller, owner_id: int | None) -> bool:
    """May ``caller`` act on a VM or snapshot of ``owner_id``: its own, or any with
    ``vms.manage_all_vms`` (held by the user and, for a scoped token, among its scopes)."""
    return owner_id == caller.user.pk or caller.has(MANAGE_ALL)


def may(caller: Caller, verb: str, owner_id: int | None) -> bool:
    """May ``caller`` ask ``verb`` (a verb of the lifecycle table) of what ``owner_id`` owns
    (None for a verb that creates a VM: only the permissions count)?"""
    row = lifecycle.verb(verb)
    if not all(caller.has(p) for p in row.permissions):
        return False
    return row.target == "new" or may_act_on(caller, owner_id)


def require(caller: Caller, verb: str, owner_id: int | None = None) -> None:
    """``PermissionDenied`` (403) unless ``caller`` may ask ``verb`` of what ``owner_id`` owns;
    the message names the missing permission, or says the VM is not the caller's."""
    row = lifecycle.verb(verb)
    for perm in row.permissions:
        caller.require(perm)
    if row.target != "new" and not may_act_on(caller, owner_id):
        raise PermissionDenied(NOT_YOURS)


def scope_of(verb: str) -> Needs:
    """The token scope ``verb`` needs (its permission; ``require`` asks the others too): the
    API's actions and the websockets (console input, exec) ask here, so a token is narrowed by
    the same rule the policy applies."""
    return needs(lifecycle.verb(verb).permission)


def may_create(caller: Caller) -> bool:
    """May ``caller`` define a new VM (the pages offer "New VM" only then)?"""
    return may(caller, "create", None)


def console_mode(caller: Caller, vm: VirtualMachine) -> Literal["write", "read"]:
    """A console on a VM the caller sees: it types if it may use the console verb on it, else
    it watches."""
    return "write" if may(caller, "console", vm.owner_id) else "read"


# --- Networks -----------------------------------------------------------------------------------

# Defining, changing and deleting networks: administrators (the admin role holds every
# permission); every signed-in user reads them (a VM's page names its network).
NETWORK_PERMISSIONS = {
    "add": "vms.add_network",
    "change": "vms.change_network",
    "delete": "vms.delete_network",
}


def may_manage_networks(caller: Caller, action: str = "change") -> bool:
    return caller.has(NETWORK_PERMISSIONS[action])


def require_network_admin(caller: Caller, action: str) -> None:
    """``PermissionDenied`` unless ``caller`` may ``action`` (add, change, delete) networks."""
    caller.require(NETWORK_PERMISSIONS[action])


# --- Warm pools: administrators' ------------------------------------------------------------

POOL_PERMISSIONS = {"view": "vms.view_poolmember", "change": "vms.change_poolmember"}


def may_manage_pools(caller: Caller, action: str = "change") -> bool:
    """May ``caller`` read (``view``) the warm pools or set their targets (``change``)?"""
    return caller.has(POOL_PERMISSIONS[action])


def require_pool_admin(caller: Caller, action: str = "change") -> None:
    """``PermissionDenied`` unless ``caller`` may ``action`` (view, change) the warm pools."""
    caller.require(POOL_PERMISSIONS[action])


# --- Quotas and team budgets: administrators' -----------------------------------------------

QUOTA_PERMISSIONS = {"view": "vms.view_quota", "change": "vms.change_quota"}


def may_manage_quotas(caller: Caller, action: str = "change") -> bool:
    """May ``caller`` read (``view``; ``change`` implies it) or set users' and groups' quotas
    and team budgets? Everyone reads their own (``/api/v1/quotas/me/``)."""
    if action == "view" and caller.has(QUOTA_PERMISSIONS["change"]):
        return True
    return caller.has(QUOTA_PERMISSIONS[action])


def require_quota_admin(caller: Caller, action: str = "change") -> None:
    """``PermissionDenied`` unless ``caller`` may ``action`` (view, change) quotas."""
    if not may_manage_quotas(caller, action):
        caller.require(QUOTA_PERMISSIONS[action])
        raise PermissionDenied(f"you need the {QUOTA_PERMISSIONS[action]} permission")
