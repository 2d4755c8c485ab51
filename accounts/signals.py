"""Receivers for Django's auth signals: every login, logout and failure becomes an event.

These are auth signals sent by ``authenticate()``/``login()``/``logout()`` on every path (the
login page, the admin, DRF session logins), not model signals. Also ``post_migrate``: the roles
are synced after the last app's migration (``accounts.roles.sync_roles_after_migrate``).
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.db.models.signals import post_migrate
from django.dispatch import receiver

from accounts import backends, commands, roles
from audit.actor import Actor

post_migrate.connect(roles.sync_roles_after_migrate, dispatch_uid="sandbox_sync_roles")


@receiver(user_logged_in, dispatch_uid="sandbox_logged_in")
def on_logged_in(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    commands.record_login(Actor.for_user(user), user)


@receiver(user_logged_out, dispatch_uid="sandbox_logged_out")
def on_logged_out(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    if user is not None:
        commands.record_logout(Actor.for_user(user), user)


@receiver(user_login_failed, dispatch_uid="sandbox_login_failed")
def on_login_failed(
    sender: Any, credentials: dict[str, Any], request: Any = None, **kwargs: Any
) -> None:
    username = str(credentials.get("username") or "")
    # A refusal without checking the password (reason "locked") is no failure of the account.
    reason = (
        getattr(request, "_sandbox_login_failure", "bad_credentials")
        if request
        else backends.refusal_without_request() or "bad_credentials"
    )
    until = commands.record_login_failure(Actor.anonymous(username), username, reason)
    if request is not None and until is not None:
        request._sandbox_locked_until = until
