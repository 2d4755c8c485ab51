"""Access review: who could do what at a moment, and who changed it, folded from the log alone.

Users (role, superuser, active), API tokens (owner, scopes, read-only flag, allowed addresses,
expiry) and roles (members) as they stood just before ``until``, and every grant and revocation
recorded in ``[since, until)`` with who made it. Computed from ``user.*`` and ``token.*`` events
only, so the same moment always gives the same review, at any past moment, and it shows what the
log vouches for: an account created around the command functions (and so around the log) is
not in it. Role permissions are the ones configured now (they are not events).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from django.contrib.auth.models import Group

from audit.compliance import ACCESS_TYPES
from audit.hashing import format_time
from audit.store import iter_events

__all__ = ["AccessReview", "TokenState", "UserState", "build"]


@dataclass
class UserState:
    user_id: str
    username: str
    role: str
    superuser: bool
    active: bool
    created_at: str
    created_by: str


@dataclass
class TokenState:
    token_id: str
    name: str
    username: str
    scopes: list[str]
    read_only: bool
    allowed_ips: list[str]
    expires_at: str | None
    created_at: str
    created_by: str
    revoked_at: str | None = None
    revoked_by: str = ""

    def active_at(self, moment: datetime) -> bool:
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or datetime.fromisoformat(self.expires_at) > moment


@dataclass
class AccessReview:
    since: datetime | None
    until: datetime
    users: dict[str, UserState] = field(default_factory=dict)
    tokens: dict[str, TokenState] = field(default_factory=dict)
    changes: list[dict[str, Any]] = field(default_factory=list)

    def roles(self) -> list[dict[str, Any]]:
        """Each role with its members at ``until`` and its permissions (as configured now)."""
        perms = {
            g.name: sorted(f"{p.content_type.app_label}.{p.codename}" for p in g.permissions.all())
            for g in Group.objects.prefetch_related("permissions__content_type")
        }
        members: dict[str, list[str]] = {}
        for u in self.users.values():
            if u.active:
                members.setdefault(u.role, []).append(u.username)
        names = sorted(set(perms) | set(members))
        return [
            {
                "role": name,
                "members": sorted(members.get(name, [])),
                "permissions": perms.get(name, []),
            }
            for name in names
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": format_time(self.until),
            "since": format_time(self.since) if self.since else None,
            "users": [asdict(u) for u in sorted(self.users.values(), key=lambda u: u.username)],
            "roles": self.roles(),
            "tokens": [
                asdict(t) | {"active": t.active_at(self.until)}
                for t in sorted(self.tokens.values(), key=lambda t: (t.username, t.token_id))
            ],
            "changes": self.changes,
        }


def _detail(event_type: str, d: dict[str, Any]) -> str:
    who = d.get("username", "?")
    if event_type == "user.created":
        return f"{who} created with role {d.get('role') or 'none'}" + (
            " (superuser)" if d.get("superuser") else ""
        )
    if event_type == "user.role_changed":
        return f"{who}: role {d.get('from') or 'none'} -> {d.get('to')}"
    if event_type == "user.superuser_changed":
        return f"{who}: superuser {'granted' if d.get('superuser') else 'removed'}"
    if event_type == "token.created":
        scopes = ", ".join(d.get("scopes") or []) or "all of the user's permissions"
        return (
            f"token {d.get('token_id')} ({d.get('name', '')}) for {who}: scopes {scopes}; "
            f"{'read-only' if d.get('read_only') else 'read-write'}; "
            f"expires {d.get('expires_at') or 'never'}"
        )
    if event_type == "token.revoked":
        return f"token {d.get('token_id')} ({d.get('name', '')}) of {who} revoked"
    return f"{who}: {event_type.split('.', 1)[1].replace('_', ' ')}"


def build(until: datetime, since: datetime | None = None) -> AccessReview:
    """The review at ``until`` (events recorded before it), changes from ``since`` on."""
    review = AccessReview(since=since, until=until)
    users, tokens = review.users, review.tokens
    for batch in iter_events(0, types=ACCESS_TYPES):
        for e in batch:
            if e.recorded_at >= until:
                return review
            d = e.data
            when = format_time(e.recorded_at)
            uid = e.aggregate_id
            if e.type == "user.created":
                users[uid] = UserState(
                    uid,
                    str(d.get("username", "")),
                    str(d.get("role", "")),
                    bool(d.get("superuser")),
                    True,
                    when,
                    e.actor_name,
                )
            elif e.type == "user.role_changed" and uid in users:
                users[uid].role = str(d.get("to", ""))
                # The admin role is the superuser flag (accounts.commands keeps them together).
                users[uid].superuser = users[uid].role == "admin"
            elif e.type == "user.superuser_changed" and uid in users:
                users[uid].superuser = bool(d.get("superuser"))
            elif e.type in ("user.deactivated", "user.reactivated") and uid in users:
                users[uid].active = e.type == "user.reactivated"
                if e.type == "user.deactivated":
                    # A deactivated user's tokens die with the account (accounts.commands).
                    for t in tokens.values():
                        if t.username == users[uid].username and t.revoked_at is None:
                            t.revoked_at, t.revoked_by = when, e.actor_name
            elif e.type == "token.created":
                tokens[uid] = TokenState(
                    uid,
                    str(d.get("name", "")),
                    str(d.get("username", "")),
                    list(d.get("scopes") or []),
                    bool(d.get("read_only")),
                    list(d.get("allowed_ips") or []),
                    d.get("expires_at"),
                    when,
                    e.actor_name,
                )
            elif e.type == "token.revoked" and uid in tokens and tokens[uid].revoked_at is None:
                tokens[uid].revoked_at, tokens[uid].revoked_by = when, e.actor_name
            if since is None or e.recorded_at >= since:
                review.changes.append(
                    {
                        "position": e.position,
                        "event_id": e.event_id,
                        "type": e.type,
                        "recorded_at": when,
                        "by": e.actor_name,
                        "source_ip": e.source_ip,
                        "subject": f"{e.aggregate_type}:{e.aggregate_id}",
                        "detail": _detail(e.type, d),
                    }
                )
    return review
