"""What an API token may do: the one place where its read-only flag and scopes meet endpoints.

Every API operation states the permission it needs (its *scope*) in ``token_scopes`` on its view
(or consumer), keyed by action, ``action:method`` or HTTP method::

    token_scopes = {"list": VM_READ, "create": needs("vms.add_virtualmachine")}

A token with scopes may call an operation only when one of the operation's permissions is among
its scopes; a token without scopes may do what its user may. A read-only token may only use safe
methods (GET, HEAD, OPTIONS): everything else is a write. An operation that states no scope is
refused to every scoped token (fail closed). ``accounts.authentication`` applies this to every
request authenticated by a token, before any view's own ``permission_classes`` run, so a view
cannot drop it; the websocket consumers call ``accounts.authentication.socket_refused``
(which uses :func:`check_socket`) before they accept.

Whether the *user* may do the thing is decided as before (``HasPerm``, the command functions):
a token narrows its user, it never widens it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from accounts import roles
from accounts.models import APIToken
from audit.scopes import AUDIT_READ, EXPORT
from core.scopes import OPEN, Needs, needs

__all__ = [
    "AUDIT_READ",
    "EXPORT",
    "MANAGE_ALL_VMS",
    "OPEN",
    "READ_ONLY_MESSAGE",
    "Refusal",
    "SCOPES",
    "SELF_SERVICE",
    "TOKEN_READ",
    "USER_READ",
    "VM_READ",
    "Needs",
    "check_socket",
    "is_write",
    "needs",
    "refusal",
    "required_scope",
]

READ_ONLY_MESSAGE = "This API token is read-only."
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")  # everything else is a write


# Reading VMs, their timelines, snapshots and requests: the view permissions, or any permission
# that acts on VMs (a token that may exec in a VM may also see which VMs it may exec in).
VM_READ = needs(*roles.VM_VIEW, *roles.VM_DRIVE)
USER_READ = needs("accounts.view_user", "accounts.manage_users")
# Your own API tokens: every user holds these for its own tokens (see SELF_SERVICE);
# accounts.manage_all_tokens widens them to every user's.
TOKEN_READ = needs(
    "accounts.view_apitoken",
    "accounts.add_apitoken",
    "accounts.delete_apitoken",
    "accounts.manage_all_tokens",
)

# Permissions every user holds over its own things, whatever its role.
SELF_SERVICE = frozenset(
    {"accounts.view_apitoken", "accounts.add_apitoken", "accounts.delete_apitoken"}
)

# Widens a VM scope from the user's own VMs to every user's (``vms.policy.may_act_on``); an
# operation never accepts it alone. Like the view permissions, which VMs a token reaches follows
# its scopes, not only its user's role.
MANAGE_ALL_VMS = "vms.manage_all_vms"

# What a token's scopes may name: every permission some operation states, and the wideners.
SCOPES: tuple[str, ...] = tuple(
    sorted(
        {
            *roles.VM_VIEW,
            *roles.VM_DRIVE,
            *roles.AUDIT,
            *roles.SECRET_DRIVE,
            *roles.SECRET_VIEW,
            "secretstore.manage_all_secrets",
            *roles.WEBHOOK_DRIVE,
            *roles.WEBHOOK_VIEW,
            "webhooks.manage_all_subscriptions",
            "webhooks.allow_private_targets",
            "accounts.view_user",
            "accounts.manage_users",
            "accounts.manage_all_tokens",
            MANAGE_ALL_VMS,
            *SELF_SERVICE,
            # Defining, changing and deleting networks (vms.policy.NETWORK_PERMISSIONS).
            "vms.add_network",
            "vms.change_network",
            "vms.delete_network",
            # Reading and setting quotas and team budgets (vms.commands.set_quota).
            "vms.view_quota",
            "vms.change_quota",
            # Reading warm pools and setting their targets (vms.policy.POOL_PERMISSIONS).
            "vms.view_poolmember",
            "vms.change_poolmember",
        }
    )
)


def required_scope(view: Any, method: str) -> Needs | None:
    """The scope ``view`` states for ``method`` (and its current action), or None."""
    table: Mapping[str, Needs] | None = getattr(view, "token_scopes", None)
    if not table:
        return None
    method = method.lower()
    action = getattr(view, "action", None)
    if method == "head":
        method = "get"
    keys = [f"{action}:{method}", action] if action else []
    keys.append(method)
    for key in keys:
        if key in table:
            return table[key]
    return None


@dataclass(frozen=True)
class Refusal:
    """Why a token may not do something: ``reason`` for the log, ``detail`` for the client."""

    reason: str  # "read_only" or "out_of_scope"
    detail: str


def refusal(token: APIToken, scope: Needs | None, *, write: bool) -> Refusal | None:
    """Why ``token`` may not call an operation needing ``scope`` (None: it may)."""
    if write and token.read_only:
        return Refusal("read_only", READ_ONLY_MESSAGE)
    if not token.scopes:
        return None
    if scope is None:
        return Refusal(
            "out_of_scope", "This endpoint states no scope, so a scoped API token may not use it."
        )
    if not scope.allows(token.scopes):
        return Refusal(
            "out_of_scope",
            f"This API token's scopes do not include {' or '.join(scope.as_list())}.",
        )
    return None


def is_write(method: str) -> bool:
    return method.upper() not in SAFE_METHODS


def check_socket(scope: Mapping[str, Any], needed: Needs, *, write: bool) -> Refusal | None:
    """For a websocket consumer: why the connection's token may not do this (None: it may, or
    the connection has no token). Marks the check as done, so the token middleware lets the
    consumer accept the connection."""
    token = scope.get("auth")
    mark = scope.get("token_checked")
    if mark is not None:
        mark.append(True)
    if not isinstance(token, APIToken):
        return None
    return refusal(token, needed, write=write)
