"""Every event type the product records, in one place, each with its schema version.

Types are named in the past tense. Adding a type: add it here with ``schema_version=1``; changing
the shape of its data: bump the version and keep projectors able to read the old one.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EventType", "get", "all_types", "types_for"]


@dataclass(frozen=True, slots=True)
class EventType:
    name: str
    aggregate_type: str
    schema_version: int
    category: str  # access, change, data, monitoring, operations
    description: str


_TYPES: dict[str, EventType] = {}


def _define(name: str, aggregate: str, category: str, description: str, version: int = 1) -> None:
    _TYPES[name] = EventType(name, aggregate, version, category, description)


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

# Virtual machines: a request event per command, then the worker's outcome event(s).
for _verb, _outcomes in (
    ("create", ()),
    ("start", ("started", "start_failed")),
    ("stop", ("stopped", "stop_failed")),
    ("reboot", ("rebooted", "reboot_failed")),
    ("pause", ("paused", "pause_failed")),
    ("resume", ("resumed", "resume_failed")),
    ("resize", ("resized", "resize_failed")),
    ("snapshot", ("snapshotted", "snapshot_failed")),
    ("restore", ("restored", "restore_failed")),
    ("destroy", ("destroyed", "destroy_failed")),
):
    _define(f"vm.{_verb}_requested", "vm", "change", f"A {_verb} of a VM was requested.")
    for _outcome in _outcomes:
        _define(f"vm.{_outcome}", "vm", "change", f"Worker outcome of a {_verb} request.")
_define("vm.created", "vm", "change", "A VM was defined (spec, owner, template, identity).")
_define("vm.progress", "vm", "operations", "A step of a long VM operation (booting, snapshotting).")
_define("vm.crashed", "vm", "monitoring", "The reconciler found the VM's VMM dead.")
_define("vm.recovered", "vm", "monitoring", "The reconciler brought a VM record back in line.")
# Guest access: the request is committed before the agent is asked (if it cannot be recorded,
# nothing runs); its outcome, completed or failed, names the request as its causation.
_define(
    "vm.exec_requested",
    "vm",
    "data",
    "A command was asked for in the guest (argv, cwd, env names, timeout), before it ran.",
)
_define(
    "vm.exec_completed", "vm", "data", "A command ran in the guest (argv, exit, output hashes)."
)
_define(
    "vm.exec_failed",
    "vm",
    "data",
    "A requested command got no result from the guest (agent timeout, refusal, unreachable).",
)
_define(
    "vm.file_upload_requested", "vm", "data", "A file upload into the guest was asked for (path)."
)
_define(
    "vm.file_uploaded", "vm", "data", "A file was written into the guest (path, size, SHA-256)."
)
_define("vm.file_upload_failed", "vm", "data", "A requested upload into the guest failed.")
_define("vm.file_download_requested", "vm", "data", "A file download from the guest was asked for.")
_define("vm.file_downloaded", "vm", "data", "A file was read from the guest (path, size, SHA-256).")
_define("vm.file_download_failed", "vm", "data", "A requested download from the guest failed.")
_define("vm.console_opened", "vm", "access", "A console session started (recording referenced).")
_define("vm.console_closed", "vm", "access", "A console session ended (recording, size, SHA-256).")

# Snapshots.
_define(
    "snapshot.created", "snapshot", "data", "A snapshot was taken (files and SHA-256 manifest)."
)
_define("snapshot.verified", "snapshot", "data", "A snapshot's manifest was checked before use.")
_define("snapshot.corrupted", "snapshot", "data", "A snapshot failed its manifest check.")
_define("snapshot.deleted", "snapshot", "data", "A snapshot was deleted (by a user or retention).")

# Networking.
_define("net.ip_leased", "vm", "change", "An address was leased to a VM.")
_define("net.ip_released", "vm", "change", "A VM's address was released.")
_define("net.port_forward_added", "vm", "change", "A host port was forwarded to a VM.")
_define("net.port_forward_removed", "vm", "change", "A port forward was removed.")

# Quotas are settings (SANDBOX_QUOTA_*), not changed through the product: no quota event yet.

# The audit log itself.
_define("audit.digest_signed", "audit", "monitoring", "A signed digest covers a range of events.")
_define(
    "audit.digest_signing_failed",
    "audit",
    "monitoring",
    "A digest was not signed (broken chain, untrusted key, sink); the break is named in data.",
)
_define("audit.chain_verified", "audit", "monitoring", "A chain verification ran (result in data).")
_define("audit.projection_rebuilt", "audit", "monitoring", "A projection was rebuilt from zero.")
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


def get(name: str) -> EventType | None:
    return _TYPES.get(name)


def all_types() -> list[EventType]:
    return sorted(_TYPES.values(), key=lambda t: t.name)


def types_for(category: str) -> frozenset[str]:
    return frozenset(t.name for t in _TYPES.values() if t.category == category)
