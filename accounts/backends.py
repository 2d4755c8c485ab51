"""Password authentication that refuses throttled addresses and locked accounts, with cheap
permission checks."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.hashers import make_password
from django.core.exceptions import PermissionDenied

from accounts import commands, throttle
from accounts.permission_cache import every_perm, perms_of_group
from audit.actor import Actor

# Why the last attempt without a request was refused unchecked ("locked"), for the receiver of
# user_login_failed (accounts.signals), which has no request to read it from.
_refused_without_request: ContextVar[str | None] = ContextVar(
    "refused_without_request", default=None
)


def refusal_without_request() -> str | None:
    """The reason the last ``authenticate()`` without a request was refused unchecked, once."""
    reason = _refused_without_request.get()
    _refused_without_request.set(None)
    return reason


class LockoutModelBackend(ModelBackend):
    """ModelBackend that stops at a throttled source address or a locked username, before the
    password is even checked (``accounts.throttle``, ``accounts.commands.lock_ends``). Each
    attempt takes a slot of its address and of its username first (``throttle.reserve``), so
    parallel attempts cannot exceed either limit. A locked username, real or not, costs one
    password hash, like a wrong password, and gets the same answer.

    Raising PermissionDenied makes ``authenticate()`` give up and send ``user_login_failed``,
    whose receiver records the attempt with reason ``locked``.

    Permissions come from the user's role groups only (the product grants none per user): a
    group's permission set is cached per process (``accounts.permission_cache``, cleared when
    ``sync_roles`` runs), and the user's group membership is read fresh once per request, so
    a role change applies to the very next request.
    """

    def authenticate(
        self, request: Any, username: str | None = None, password: str | None = None, **kwargs: Any
    ) -> Any:
        if username is None:
            username = kwargs.get("username")
        if request is None:
            _refused_without_request.set(None)
            if username and commands.lock_ends(username) is not None:
                _refused_without_request.set("locked")
                raise PermissionDenied("account locked")
            return super().authenticate(request, username=username, password=password, **kwargs)
        # An address over its failure limit is refused before any lookup or hashing; so is one
        # whose attempt slots of this window are all taken by attempts still being checked.
        source = Actor.anonymous().source_ip
        until = throttle.refused_until(source)
        slot = None
        if until is None:
            slot, until = throttle.reserve(source)
        if until is not None:
            request._sandbox_login_failure = "throttled"
            request._sandbox_throttled_until = until
            raise PermissionDenied("too many failed logins from this address")
        # A locked username, real or made up, is refused after as much work as a wrong password
        # (one hash), so that neither the answer nor its time says whether the name exists.
        # The slot is taken before the lock is read: a lock recorded meanwhile is seen.
        name = commands.normalize_username(username or "")
        name_slot, allowed = throttle.reserve_name(name) if username else (None, True)
        if allowed and username and commands.lock_ends(username) is not None:
            throttle.release(name_slot)
            allowed = False
        if not allowed:
            make_password(password)
            request._sandbox_login_failure = "locked"
            raise PermissionDenied("account locked")
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is not None:
            throttle.release(slot)
            throttle.clear_name(name)
        return user

    def get_all_permissions(self, user_obj: Any, obj: Any = None) -> set[str]:
        if not user_obj.is_active or user_obj.is_anonymous or obj is not None:
            return set()
        if not hasattr(user_obj, "_perm_cache"):
            if user_obj.is_superuser:
                perms: set[str] = set(every_perm())
            else:
                perms = set()
                for group_id in user_obj.groups.values_list("id", flat=True):
                    perms |= perms_of_group(group_id)
            user_obj._perm_cache = perms
        return user_obj._perm_cache

    def get_group_permissions(self, user_obj: Any, obj: Any = None) -> set[str]:
        return self.get_all_permissions(user_obj, obj)

    def get_user_permissions(self, user_obj: Any, obj: Any = None) -> set[str]:
        return set()
