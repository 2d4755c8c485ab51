"""Who did it: the provenance every event carries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from core import context

if TYPE_CHECKING:
    from django.http import HttpRequest

__all__ = ["Actor", "Channel"]

Channel = Literal["dashboard", "api", "worker", "system", "shell"]
CHANNELS: frozenset[str] = frozenset({"dashboard", "api", "worker", "system", "shell"})


@dataclass(frozen=True, slots=True)
class Actor:
    """A user (possibly through an API token), or the system itself.

    ``token_id`` is the token's public key id, never its secret.
    """

    kind: Literal["user", "system", "anonymous"]
    user_id: int | None = None
    username: str = ""
    token_id: str = ""
    channel: str = "system"
    source_ip: str | None = None
    request_id: str = ""

    @classmethod
    def system(cls, channel: str = "system", name: str = "system") -> Actor:
        ctx = context.current()
        return cls(
            kind="system",
            username=name,
            channel=channel,
            request_id=ctx.request_id or "",
        )

    @classmethod
    def for_user(cls, user: object, *, token_id: str = "", channel: str | None = None) -> Actor:
        """The actor for ``user`` in the current request context (middleware-bound)."""
        ctx = context.current()
        return cls(
            kind="user",
            user_id=getattr(user, "pk", None),
            username=getattr(user, "username", ""),
            token_id=token_id,
            channel=channel or ctx.channel,
            source_ip=ctx.source_ip,
            request_id=ctx.request_id or "",
        )

    @classmethod
    def anonymous(cls, username: str = "") -> Actor:
        ctx = context.current()
        return cls(
            kind="anonymous",
            username=username,
            channel=ctx.channel,
            source_ip=ctx.source_ip,
            request_id=ctx.request_id or "",
        )

    @classmethod
    def from_request(cls, request: HttpRequest) -> Actor:
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            return cls.anonymous()
        token = getattr(request, "auth", None)
        token_id = getattr(token, "key", "") if token is not None else ""
        return cls.for_user(user, token_id=token_id)

    def as_fields(self) -> dict[str, str]:
        return {
            "actor_type": self.kind,
            "actor_id": str(self.user_id) if self.user_id is not None else "",
            "actor_name": self.username,
            "token_id": self.token_id,
            "channel": self.channel,
            "source_ip": self.source_ip or "",
            "request_id": self.request_id,
        }
