"""Access review for auditors: the live users, roles and API tokens, read-only, set against what
the audit log says (``audit.access_review``).

An auditor lists the accounts as they are in the database (the API at
``GET /api/v1/audit/accounts/`` and the dashboard page *Users & access*) and sees at once every
difference from the log: a user, role or token that the log does not vouch for is something that
happened without its event. Each listing is itself an ``audit.accounts_listed`` event.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.contrib.auth.models import Group

from accounts.models import APIToken, User
from audit import access_review
from audit.hashing import format_time

__all__ = ["differences", "live_accounts", "review"]


def _time(value: datetime | None) -> str | None:
    return format_time(value) if value is not None else None


def live_accounts() -> dict[str, Any]:
    """Users, roles and tokens as the database holds them now (never a token's digest)."""
    users = [
        {
            "user_id": str(u.pk),
            "username": u.username,
            "role": u.role,
            "superuser": u.is_superuser,
            "active": u.is_active,
            "last_login": _time(u.last_login),
            "date_joined": _time(u.date_joined),
        }
        for u in User.objects.order_by("username").prefetch_related("groups")
    ]
    tokens = [
        {
            "token_id": t.key,
            "name": t.name,
            "username": t.user.username,
            "scopes": list(t.scopes),
            "read_only": t.read_only,
            "allowed_ips": list(t.allowed_ips),
            "created_at": _time(t.created_at),
            "expires_at": _time(t.expires_at),
            "revoked_at": _time(t.revoked_at),
            "last_used_at": _time(t.last_used_at),
            "last_used_ip": t.last_used_ip,
            "active": t.is_active,
        }
        for t in APIToken.objects.select_related("user").order_by("user__username", "key")
    ]
    roles = [
        {
            "role": g.name,
            "members": sorted(u.username for u in g.user_set.all() if u.is_active),
            "permissions": sorted(
                f"{p.content_type.app_label}.{p.codename}" for p in g.permissions.all()
            ),
        }
        for g in Group.objects.order_by("name").prefetch_related(
            "user_set", "permissions__content_type"
        )
    ]
    return {"users": users, "roles": roles, "tokens": tokens}


def differences(live: dict[str, Any], log: access_review.AccessReview) -> list[str]:
    """What the database holds that the log does not say (or says otherwise), one line each."""
    out: list[str] = []
    logged_users = {u.user_id: u for u in log.users.values()}
    for u in live["users"]:
        seen = logged_users.pop(u["user_id"], None)
        if seen is None:
            out.append(f"user {u['username']}: in the database, never created in the log")
            continue
        if seen.role != u["role"]:
            out.append(
                f"user {u['username']}: role {u['role'] or 'none'}, the log says {seen.role}"
            )
        if seen.active != u["active"]:
            state = "active" if u["active"] else "inactive"
            out.append(f"user {u['username']}: {state}, the log says otherwise")
        if seen.superuser != u["superuser"]:
            out.append(f"user {u['username']}: superuser {u['superuser']}, the log says otherwise")
    for u in logged_users.values():
        out.append(f"user {u.username}: in the log, no longer in the database")
    logged_tokens = dict(log.tokens)
    for t in live["tokens"]:
        seen_token = logged_tokens.pop(t["token_id"], None)
        if seen_token is None:
            out.append(f"token {t['token_id']} of {t['username']}: never created in the log")
            continue
        if (t["revoked_at"] is None) != (seen_token.revoked_at is None):
            out.append(f"token {t['token_id']}: revocation differs from the log")
        if sorted(t["scopes"]) != sorted(seen_token.scopes) or (
            t["read_only"] != seen_token.read_only
        ):
            out.append(f"token {t['token_id']}: scopes or read-only flag differ from the log")
    for token_id in logged_tokens:
        out.append(f"token {token_id}: in the log, no longer in the database")
    return out


def review(days: int = 90) -> dict[str, Any]:
    """The live accounts, the log's view of them now, and the differences."""
    now = datetime.now(UTC)
    log = access_review.build(now, now - timedelta(days=days))
    live = live_accounts()
    return {
        "at": format_time(now),
        **live,
        "differences_from_log": differences(live, log),
        "changes": log.changes,
    }
