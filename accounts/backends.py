"""Password authentication that refuses locked accounts."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.backends import ModelBackend
from django.core.exceptions import PermissionDenied

from accounts.commands import is_locked


class LockoutModelBackend(ModelBackend):
    """ModelBackend that stops at a locked username, before the password is even checked.

    Raising PermissionDenied makes ``authenticate()`` give up and send ``user_login_failed``,
    whose receiver records the attempt with reason ``locked``.
    """

    def authenticate(
        self, request: Any, username: str | None = None, password: str | None = None, **kwargs: Any
    ) -> Any:
        if username is None:
            username = kwargs.get("username")
        if username and is_locked(username):
            if request is not None:
                request._sandbox_login_failure = "locked"
            raise PermissionDenied("account locked")
        return super().authenticate(request, username=username, password=password, **kwargs)
