"""Every event type the product records, in one place, each with its schema version.

Types are named in the past tense. Adding a type: add it here with ``schema_version=1``; changing
the shape of its data: bump the version and keep projectors able to read the old one.

An app above audit registers the types of its own domain with ``register`` while the apps load
(the VM domain's come from its lifecycle table, imported by its app config module), so audit
imports no app and names none of their types. Every reader (the store's validation, projector
subscriptions, the compliance mapping, exports) reads after that; a registration after the first
read is refused, since what was derived from the catalogue before it would silently miss the new
types.

A type says, besides its category, what compliance reports may count it as (``evidence``, the
roles of ``EVIDENCE_ROLES``; ``audit.compliance`` derives its event sets from these), or why no
control counts it (``not_evidence``; ``not_appended`` when nothing in the product appends it
yet). So a type registered by an upper app is counted by the reports through its own
definition, and audit names no type of another domain.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "EVIDENCE_ROLES",
    "EventType",
    "all_types",
    "get",
    "register",
    "types_for",
    "with_role",
]

# What an event type may evidence in the compliance reports (``audit.compliance``).
EVIDENCE_ROLES: dict[str, str] = {
    "guest_command": "a command in a guest: its request and its outcome",
    "guest_transfer": "a file transfer into or out of a guest: its request and its outcome",
    "console_session": "a console session opened or closed",
    "backup": "a backup taken, checked, deleted or restored (and their failures)",
    "integrity_check": "a check of stored data that found it damaged",
    "crash": "a guest or its VMM found dead",
    "preview_link": "a shareable link that opens a guest's service to whoever holds it",
    "egress_evidence": "a guest's connections refused by its egress policy, and its DNS lookups",
}


@dataclass(frozen=True, slots=True)
class EventType:
    name: str
    aggregate_type: str
    schema_version: int
    category: str  # access, change, data, monitoring, operations
    description: str
    evidence: frozenset[str] = frozenset()  # roles of EVIDENCE_ROLES
    not_evidence: str = ""  # why no control counts it (when it is not evidence of anything)
    not_appended: str = ""  # why nothing in the product appends it yet (never counted)

    def __post_init__(self) -> None:
        unknown = sorted(self.evidence - EVIDENCE_ROLES.keys())
        if unknown:
            raise ValueError(f"{self.name}: unknown evidence roles {unknown}")
        if self.not_appended and (self.evidence or self.not_evidence):
            raise ValueError(f"{self.name}: a type nothing appends cannot be evidence")


_TYPES: dict[str, EventType] = {}
_read = False  # set by the first read: later registrations are refused


def _define(
    name: str,
    aggregate: str,
    category: str,
    description: str,
    version: int = 1,
    *,
    not_evidence: str = "",
) -> None:
    _TYPES[name] = EventType(
        name, aggregate, version, category, description, frozenset(), not_evidence
    )


# Accounts and access (security events).
_define("auth.logged_in", "account", "access", "A user logged in to the dashboard.")
_define("auth.logged_out", "account", "access", "A user logged out.")
_define("auth.login_failed", "account", "access", "A login attempt failed (reason in data).")
_define("auth.locked_out", "account", "access", "Repeated failures locked an account.")
_define("auth.unlocked", "account", "access", "An administrator unlocked an account.")
_define("auth.token_rejected", "token", "access", "An existing API token was refused.")
_define(
    "auth.unknown_user_failed",
    "login_source",
    "access",
    "A login for a username that does not exist failed: the first from an address in a window "
    "(the window's count is in auth.login_throttled when the address reaches the limit, else "
    "in the address's first such event of the next window).",
)
_define(
    "auth.login_throttled",
    "login_source",
    "access",
    "An address reached the failed-login limit: its logins are refused, before any password is "
    "checked, until the time in data.",
)
_define("user.created", "user", "access", "A user account was created.")
_define("user.role_changed", "user", "access", "A user's role changed.")
_define("user.deactivated", "user", "access", "A user account was deactivated.")
_define("user.reactivated", "user", "access", "A user account was reactivated.")
_define("user.password_changed", "user", "access", "A user's password was changed.")
_define("token.created", "token", "access", "An API token was created (secret shown once).")
_define("token.revoked", "token", "access", "An API token was revoked.")
_define(
    "token.rehashed",
    "token",
    "access",
    "An API token hashed with an older pepper was re-hashed with the current one at its use "
    "(pepper key ids in data).",
)
# Control-plane keys (docs/security.md, "Key rotation"): key ids only, never key material.
_define(
    "key.rotated",
    "key",
    "access",
    "A control-plane key was rotated: a new key id signs or hashes from now on (kind, new and "
    "previous key ids in data).",
)
_define(
    "key.retired",
    "key",
    "access",
    "A former control-plane key was retired: what only it accepts is refused from now on "
    "(a retired digest key's public half stays, for verification).",
)

# The VM domain's types are registered by the VM app's lifecycle table, the table of VM verbs
# they are derived from (``register`` below), while the apps load.

# Quotas: a user's, a group's allowance per member, a group's shared team budget (the defaults
# are settings, SANDBOX_QUOTA_*, outside the log). Aggregate "<scope>:<id>" of the target.
_define(
    "quota.changed",
    "quota",
    "change",
    "A user's quota, a group's quota per member or a group's team budget was set, changed or "
    "removed (scope, target, the limits before and after in data).",
)

# The audit log itself.
_define("audit.digest_signed", "audit", "monitoring", "A signed digest covers a range of events.")
_define(
    "audit.digest_signing_failed",
    "audit",
    "monitoring",
    "A digest was not signed (broken chain, untrusted key, sink); the break is named in data.",
)
_define("audit.chain_verified", "audit", "monitoring", "A chain verification ran (result in data).")
_define(
    "audit.projection_rebuilt",
    "audit",
    "monitoring",
    "A projection was rebuilt from zero.",
    not_evidence="an operator's repair of read models; the events are unchanged",
)
_define("audit.exported", "audit", "data", "An audit report or evidence bundle was exported.")
# What auditors do (PCI DSS 10.2.1.3: access to the audit logs is itself logged).
_define("audit.trail_read", "audit", "access", "The audit trail was read (API or dashboard).")
_define("audit.accounts_listed", "audit", "access", "Users, roles or tokens were listed.")
_define("audit.export_downloaded", "audit", "data", "A finished audit export was downloaded.")
_define(
    "audit.export_refused", "audit", "monitoring", "An export was refused: the chain is broken."
)
_define(
    "audit.break_acknowledged",
    "audit",
    "monitoring",
    "An administrator acknowledged a break on record (who and why in data); reports state it.",
)
# Retention.
_define("audit.legal_hold_placed", "audit", "monitoring", "A legal hold was placed on the log.")
_define("audit.legal_hold_released", "audit", "monitoring", "A legal hold was released.")

# The worker.
_define(
    "system.task_refused",
    "system",
    "monitoring",
    "The worker refused a task that is not one of the product's (function, hook and schedule "
    "in data); it did not run.",
)


def register(*types: EventType) -> None:
    """Add the event types of an app's domain (called while the apps load, from the app).

    Registering a type again with the same definition does nothing (a module imported twice);
    a different definition of a known name, or a new type after the catalogue was first read,
    is a programming error (RuntimeError)."""
    for t in types:
        known = _TYPES.get(t.name)
        if known is not None and known != t:
            raise RuntimeError(f"event type {t.name} is already defined differently: {known}")
    new = [t for t in types if t.name not in _TYPES]
    if new and _read:
        raise RuntimeError(
            f"event types registered after the catalogue was read: {[t.name for t in new]}; "
            "register them while the apps load (from the app's apps.py imports)"
        )
    for t in new:
        _TYPES[t.name] = t


def get(name: str) -> EventType | None:
    global _read
    _read = True
    return _TYPES.get(name)


def all_types() -> list[EventType]:
    global _read
    _read = True
    return sorted(_TYPES.values(), key=lambda t: t.name)


def types_for(category: str) -> frozenset[str]:
    global _read
    _read = True
    return frozenset(t.name for t in _TYPES.values() if t.category == category)


def with_role(role: str) -> frozenset[str]:
    """The names of the types that may evidence ``role`` (one of ``EVIDENCE_ROLES``)."""
    global _read
    if role not in EVIDENCE_ROLES:
        raise KeyError(role)
    _read = True
    return frozenset(t.name for t in _TYPES.values() if role in t.evidence)
