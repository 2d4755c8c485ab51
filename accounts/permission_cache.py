"""Each role group's permission set, cached per process.

Roles change only when ``accounts.roles.sync_roles`` runs, which clears this cache; a user's
group membership is read fresh per request (``accounts.backends``, ``accounts.authentication``),
so a role change applies to the very next request. Below both the roles and the backend: the
roles clear it, the backend and token authentication read it.
"""

from __future__ import annotations

import threading
from typing import Any

from django.contrib.auth.models import Permission

__all__ = ["clear_permission_cache", "every_perm", "perms_of_group", "prime_permissions"]

_group_perms: dict[int, frozenset[str]] = {}
_all_perms: frozenset[str] | None = None
_lock = threading.Lock()


def clear_permission_cache() -> None:
    """Called when role permissions are synced (accounts.roles.sync_roles)."""
    global _all_perms
    with _lock:
        _group_perms.clear()
        _all_perms = None


def perms_of_group(group_id: int) -> frozenset[str]:
    cached = _group_perms.get(group_id)
    if cached is None:
        rows = Permission.objects.filter(group__id=group_id).values_list(
            "content_type__app_label", "codename"
        )
        cached = frozenset(f"{app}.{codename}" for app, codename in rows)
        with _lock:
            _group_perms[group_id] = cached
    return cached


def every_perm() -> frozenset[str]:
    global _all_perms
    if _all_perms is None:
        rows = Permission.objects.values_list("content_type__app_label", "codename")
        _all_perms = frozenset(f"{app}.{codename}" for app, codename in rows)
    return _all_perms


def prime_permissions(user: Any, group_ids: list[int]) -> None:
    """Set ``user``'s permissions from group ids read with the user (token authentication)."""
    if not user.is_active:
        user._perm_cache = set()
    elif user.is_superuser:
        user._perm_cache = set(every_perm())
    else:
        perms: set[str] = set()
        for group_id in group_ids:
            perms |= perms_of_group(group_id)
        user._perm_cache = perms
