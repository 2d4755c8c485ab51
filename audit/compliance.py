"""The mapping from compliance controls to the events that evidence them (docs/compliance.md).

Three layers, each small enough to review by eye:

- **evidence areas**: named sets of event types (authentication, provisioning, ...), derived
  from ``audit.catalogue`` where a catalogue category fits exactly, so new event types of that
  category join automatically; a test asserts that every access, change, data and monitoring
  type belongs to some area;
- **exception rules**: events (or the absence of events) that an auditor must look at, each
  belonging to one area;
- **frameworks**: SOC 2, ISO/IEC 27001:2022, HIPAA Security Rule, PCI DSS v4.0 and GDPR, each a
  list of controls that name the areas evidencing them.

The report (``audit.reports``) counts a control's events and lists its evidence and exceptions;
it does not judge whether a control is "met": that is the auditor's call.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from audit import catalogue

__all__ = [
    "AREAS",
    "EXCEPTION_RULES",
    "FRAMEWORKS",
    "Area",
    "Control",
    "ExceptionRule",
    "Framework",
    "area_of_type",
]


@dataclass(frozen=True)
class Area:
    name: str
    title: str
    event_types: frozenset[str]


@dataclass(frozen=True)
class Control:
    id: str
    title: str
    areas: tuple[str, ...]
    evidence: str  # what the events show for this control, in one sentence


@dataclass(frozen=True)
class Framework:
    key: str
    name: str
    controls: tuple[Control, ...]


@dataclass(frozen=True)
class ExceptionRule:
    """``match(type, data)`` returns a one-line detail when the event is an exception."""

    kind: str
    title: str
    area: str
    event_types: frozenset[str]
    match: Callable[[str, dict[str, Any]], str | None]


def _types(*names: str) -> frozenset[str]:
    unknown = [n for n in names if catalogue.get(n) is None]
    if unknown:
        raise ValueError(f"not catalogued: {unknown}")
    return frozenset(names)


AREAS: dict[str, Area] = {
    a.name: a
    for a in (
        Area(
            "authentication",
            "Authentication: logins, failures, lockouts, rejected tokens",
            _types(
                "auth.logged_in",
                "auth.logged_out",
                "auth.login_failed",
                "auth.locked_out",
                "auth.unlocked",
                "auth.token_rejected",
            ),
        ),
        Area(
            "provisioning",
            "Access provisioning: users, roles, passwords, API tokens",
            _types(
                "user.created",
                "user.role_changed",
                "user.deactivated",
                "user.reactivated",
                "user.password_changed",
                "token.created",
                "token.revoked",
            ),
        ),
        Area(
            "sessions",
            "Interactive sessions on guests (consoles)",
            _types("vm.console_opened", "vm.console_closed"),
        ),
        Area(
            "change",
            "Change management: VM lifecycle, networking, quotas",
            catalogue.types_for("change"),
        ),
        Area(
            "integrity",
            "Log integrity: chain verifications, signed digests, rebuilds",
            _types("audit.chain_verified", "audit.digest_signed", "audit.projection_rebuilt"),
        ),
        Area(
            "availability",
            "Availability monitoring: crashed and recovered VMs",
            _types("vm.crashed", "vm.recovered"),
        ),
        Area(
            "data",
            "Data handling: file transfers, commands, snapshots, audit exports",
            catalogue.types_for("data"),
        ),
    )
}

_AREA_BY_TYPE: dict[str, str] = {t: a.name for a in AREAS.values() for t in a.event_types}


def area_of_type(event_type: str) -> str | None:
    return _AREA_BY_TYPE.get(event_type)


def _admin_granted(event_type: str, data: dict[str, Any]) -> str | None:
    if event_type == "user.role_changed" and data.get("to") == "admin":
        return f"{data.get('username', '?')}: role {data.get('from') or 'none'} -> admin"
    if event_type == "user.created" and (data.get("role") == "admin" or data.get("superuser")):
        return f"{data.get('username', '?')} created as admin"
    return None


def _token_without_expiry(event_type: str, data: dict[str, Any]) -> str | None:
    if data.get("expires_at") is None:
        return f"token {data.get('token_id', '?')} ({data.get('name', '')}) for " + str(
            data.get("username", "?")
        )
    return None


def _verification_failed(event_type: str, data: dict[str, Any]) -> str | None:
    if data.get("ok") is False:
        return str(data.get("problem") or "verification failed")
    return None


_VM_FAILED = frozenset(t for t in catalogue.types_for("change") if t.endswith("_failed"))

EXCEPTION_RULES: tuple[ExceptionRule, ...] = (
    ExceptionRule(
        "failed_login",
        "Failed login",
        "authentication",
        _types("auth.login_failed"),
        lambda t, d: f"reason {d.get('reason', '?')}",
    ),
    ExceptionRule(
        "lockout",
        "Account locked out",
        "authentication",
        _types("auth.locked_out"),
        lambda t, d: f"{d.get('failures', '?')} failures, locked until {d.get('until')}",
    ),
    ExceptionRule(
        "token_rejected",
        "API token rejected",
        "authentication",
        _types("auth.token_rejected"),
        lambda t, d: f"token {d.get('token_id', '?')}: {d.get('reason', '?')}",
    ),
    ExceptionRule(
        "token_without_expiry",
        "API token without expiry",
        "provisioning",
        _types("token.created"),
        _token_without_expiry,
    ),
    ExceptionRule(
        "admin_granted",
        "Administrator rights granted",
        "provisioning",
        _types("user.role_changed", "user.created"),
        _admin_granted,
    ),
    ExceptionRule(
        "chain_verification_failed",
        "Chain verification failed",
        "integrity",
        _types("audit.chain_verified"),
        _verification_failed,
    ),
    ExceptionRule(
        "vm_operation_failed",
        "VM operation failed",
        "change",
        _VM_FAILED,
        lambda t, d: f"{t}: {d.get('reason') or d.get('error') or ''}".rstrip(": "),
    ),
    ExceptionRule(
        "vm_crashed",
        "VM crashed",
        "availability",
        _types("vm.crashed"),
        lambda t, d: str(d.get("reason") or "VMM process gone"),
    ),
    ExceptionRule(
        "snapshot_corrupted",
        "Snapshot failed its manifest check",
        "data",
        _types("snapshot.corrupted"),
        lambda t, d: json.dumps(d, sort_keys=True)[:200],
    ),
)
# Period-level exception: no chain verification ran in the period (monitoring not evidenced).
NO_VERIFICATION = ExceptionRule(
    "no_chain_verification",
    "No chain verification in the period",
    "integrity",
    frozenset(),
    lambda t, d: "no audit.chain_verified event was recorded in the period",
)
RULES_BY_TYPE: dict[str, list[ExceptionRule]] = {}
for _rule in EXCEPTION_RULES:
    for _t in _rule.event_types:
        RULES_BY_TYPE.setdefault(_t, []).append(_rule)

_A, _P, _S, _C, _I, _V, _D = (
    "authentication",
    "provisioning",
    "sessions",
    "change",
    "integrity",
    "availability",
    "data",
)

FRAMEWORKS: dict[str, Framework] = {
    f.key: f
    for f in (
        Framework(
            "soc2",
            "SOC 2 (AICPA Trust Services Criteria, 2017, revised 2022)",
            (
                Control(
                    "CC6.1",
                    "Logical access security",
                    (_A, _P, _S),
                    "Every login, failure, lockout, rejected token and console session.",
                ),
                Control(
                    "CC6.2",
                    "User registration and authorization",
                    (_P,),
                    "Users created and their roles; tokens issued, with expiry.",
                ),
                Control(
                    "CC6.3",
                    "Role-based access; modification and removal",
                    (_P,),
                    "Role changes, deactivations, token revocations.",
                ),
                Control(
                    "CC7.2",
                    "Monitoring of system components for anomalies",
                    (_A, _I, _V),
                    "Failed logins and lockouts, chain verification results, VM crashes.",
                ),
                Control(
                    "CC8.1",
                    "Change management",
                    (_C,),
                    "Every VM and network change: the request, who made it, and its outcome.",
                ),
                Control(
                    "CC6.7",
                    "Transmission, movement and removal of information",
                    (_D,),
                    "File transfers into and out of guests, snapshots, audit exports.",
                ),
            ),
        ),
        Framework(
            "iso27001",
            "ISO/IEC 27001:2022 Annex A",
            (
                Control(
                    "A.5.15",
                    "Access control",
                    (_A, _P),
                    "Authentication outcomes and the access granted to each user.",
                ),
                Control(
                    "A.5.18",
                    "Access rights",
                    (_P,),
                    "Provisioning, review (role changes) and removal of access rights.",
                ),
                Control(
                    "A.8.2", "Privileged access rights", (_P, _S), "Admin grants; console sessions."
                ),
                Control(
                    "A.8.5",
                    "Secure authentication",
                    (_A,),
                    "Logins, failures, lockouts and rejected API tokens.",
                ),
                Control(
                    "A.8.15",
                    "Logging",
                    (_I,),
                    "The tamper-evident log: signed digests and chain verification results.",
                ),
                Control(
                    "A.8.16",
                    "Monitoring activities",
                    (_A, _I, _V),
                    "Anomalies: failed logins, lockouts, failed verifications, crashes.",
                ),
                Control(
                    "A.8.32",
                    "Change management",
                    (_C,),
                    "VM, network and quota changes with requester and outcome.",
                ),
                Control(
                    "A.5.14",
                    "Information transfer",
                    (_D,),
                    "Files moved into and out of guests; exports of audit data.",
                ),
                Control(
                    "A.8.13",
                    "Information backup",
                    (_D,),
                    "Snapshots taken, verified, found corrupted and deleted.",
                ),
            ),
        ),
        Framework(
            "hipaa",
            "HIPAA Security Rule (45 CFR Part 164, Subpart C)",
            (
                Control(
                    "164.312(a)(1)",
                    "Access control",
                    (_A, _P, _S),
                    "Unique users, their roles and tokens, and every access.",
                ),
                Control(
                    "164.312(b)",
                    "Audit controls",
                    (_I,),
                    "A hash-chained, signed record of activity and its verification.",
                ),
                Control(
                    "164.312(c)(1)",
                    "Integrity",
                    (_I, _D),
                    "Chain verification results; file transfers with SHA-256.",
                ),
                Control(
                    "164.312(d)",
                    "Person or entity authentication",
                    (_A,),
                    "Logins, failures, lockouts and rejected tokens.",
                ),
                Control(
                    "164.308(a)(5)(ii)(C)",
                    "Log-in monitoring",
                    (_A,),
                    "Failed logins and lockouts, listed as exceptions.",
                ),
                Control(
                    "164.312(e)(1)",
                    "Transmission security",
                    (_D,),
                    "File transfers into and out of guests, with sizes and hashes.",
                ),
            ),
        ),
        Framework(
            "pci_dss",
            "PCI DSS v4.0",
            (
                Control(
                    "6.5.1",
                    "Changes to system components are managed",
                    (_C,),
                    "VM and network changes with requester and outcome.",
                ),
                Control(
                    "7.2",
                    "Access is appropriately defined and assigned",
                    (_P,),
                    "Users, roles and tokens granted, changed and removed.",
                ),
                Control(
                    "8.2",
                    "User identification and accounts are managed",
                    (_P,),
                    "Account creation, deactivation and password changes.",
                ),
                Control(
                    "8.3",
                    "Strong authentication is established and managed",
                    (_A,),
                    "Logins, failures, lockouts after repeated failures, rejected tokens.",
                ),
                Control(
                    "10.2",
                    "Audit logs capture user activity",
                    (_A, _P, _S, _C, _D),
                    "Every user action is an event with actor, time and source.",
                ),
                Control(
                    "10.3",
                    "Audit logs are protected from destruction and modification",
                    (_I,),
                    "Append-only storage, hash chain, signed digests, verification results.",
                ),
                Control(
                    "10.4",
                    "Audit logs are reviewed to identify anomalies",
                    (_I, _A),
                    "Chain verifications run and the exceptions listed in this report.",
                ),
                Control(
                    "10.7",
                    "Failures of critical security control systems are detected",
                    (_I, _V),
                    "Failed chain verifications and crashed VMs.",
                ),
            ),
        ),
        Framework(
            "gdpr",
            "GDPR (Regulation (EU) 2016/679)",
            (
                Control(
                    "Art. 5(1)(f)",
                    "Integrity and confidentiality",
                    (_A, _I),
                    "Access outcomes and proof that the record is intact.",
                ),
                Control(
                    "Art. 25",
                    "Data protection by design and by default",
                    (_P,),
                    "Least-privilege roles and expiring tokens (exceptions listed).",
                ),
                Control(
                    "Art. 30",
                    "Records of processing activities",
                    (_D,),
                    "File transfers, commands, snapshots and audit exports.",
                ),
                Control(
                    "Art. 32",
                    "Security of processing",
                    (_A, _P, _I, _V),
                    "Access control, monitoring and integrity verification.",
                ),
                Control(
                    "Art. 33",
                    "Notification of a personal data breach (detection)",
                    (_A, _I),
                    "Security anomalies to assess: lockouts, failed verifications.",
                ),
            ),
        ),
    )
}
