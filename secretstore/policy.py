"""Who may see, change and use which secret: the one place that decides it.

A secret belongs to a user or to a group (a role group). Its owner, and every member of its
group, may see its metadata, give it a new value, delete it and give it to guests, with the
permissions for each (``secretstore.change_secret``, ``delete_secret``, ``use_secret``);
``secretstore.manage_all_secrets`` widens that to every secret, and ``view_secret`` lets a reader
(the auditor) see every secret's metadata. Nobody reads a value back: values leave the store
only towards a guest. A secret the caller may not see looks exactly like a missing one.
"""

from __future__ import annotations

from django.core.exceptions import PermissionDenied
from django.db.models import Q, QuerySet

from accounts.caller import Caller
from accounts.scopes import Needs, needs
from secretstore.models import Secret

__all__ = [
    "MANAGE_ALL",
    "SECRET_READ",
    "group_ids",
    "may_act_on",
    "may_see",
    "require",
    "usable_by_user",
    "visible_secrets",
]

MANAGE_ALL = "secretstore.manage_all_secrets"
VIEW_ALL = "secretstore.view_secret"
SECRET_READ: Needs = needs(
    VIEW_ALL,
    "secretstore.add_secret",
    "secretstore.change_secret",
    "secretstore.delete_secret",
    "secretstore.use_secret",
)


def group_ids(user: object) -> list[int]:
    if not getattr(user, "pk", None):
        return []
    return list(user.groups.values_list("id", flat=True))  # type: ignore[attr-defined]


def _owned_by(user: object) -> Q:
    return Q(owner_user_id=getattr(user, "pk", None)) | Q(owner_group_id__in=group_ids(user))


def _owns(user: object, secret: Secret) -> bool:
    if secret.owner_user_id is not None:
        return secret.owner_user_id == getattr(user, "pk", None)
    return secret.owner_group_id in group_ids(user)


def visible_secrets(caller: Caller) -> QuerySet[Secret]:
    qs = Secret.objects.select_related("owner_user", "owner_group")
    if caller.has(VIEW_ALL) or caller.has(MANAGE_ALL):
        return qs
    if not any(caller.has(p) for p in SECRET_READ.as_list()):
        return qs.none()
    return qs.filter(_owned_by(caller.user))


def may_see(caller: Caller, secret: Secret) -> bool:
    return visible_secrets(caller).filter(pk=secret.pk).exists()


def may_act_on(caller: Caller, secret: Secret) -> bool:
    return _owns(caller.user, secret) or caller.has(MANAGE_ALL)


def require(caller: Caller, perm: str, secret: Secret | None = None) -> None:
    """PermissionDenied unless ``caller`` holds ``perm`` (and, for a secret, owns it, by user
    or group, or may manage all)."""
    caller.require(perm)
    if secret is not None and not may_act_on(caller, secret):
        raise PermissionDenied("you may only act on your own and your groups' secrets")


def usable_by_user(user: object) -> QuerySet[Secret]:
    """The secrets ``user`` may give to a guest by name: its own and its groups'."""
    return Secret.objects.select_related("owner_user", "owner_group").filter(_owned_by(user))
