"""Who is asking, with what: a user, maybe through an API token whose scopes narrow the user's
permissions (a token never exceeds its user)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import PermissionDenied

from accounts.models import APIToken
from audit.actor import Actor


@dataclass(frozen=True)
class Caller:
    user: Any
    token: APIToken | None = None
    actor: Actor = field(default_factory=lambda: Actor.system())

    @classmethod
    def from_request(cls, request: Any) -> Caller:
        token = getattr(request, "auth", None)
        return cls(
            user=request.user,
            token=token if isinstance(token, APIToken) else None,
            actor=Actor.from_request(request),
        )

    @classmethod
    def for_user(
        cls, user: Any, *, channel: str = "shell", token: APIToken | None = None
    ) -> Caller:
        return cls(
            user=user,
            token=token,
            actor=Actor.for_user(user, channel=channel, token_id=getattr(token, "key", "")),
        )

    def has(self, perm: str) -> bool:
        if not self.user.has_perm(perm):
            return False
        if self.token is not None and self.token.scopes:
            return perm in self.token.scopes
        return True

    def require(self, perm: str) -> None:
        if not self.user.has_perm(perm):
            raise PermissionDenied(f"you need the {perm} permission")
        if self.token is not None and self.token.scopes and perm not in self.token.scopes:
            raise PermissionDenied(f"this API token does not hold {perm}")
