"""The mapping from compliance controls to the events that evidence them (docs/compliance.md).

Each control says, in one sentence each, what it **asks**, what the report **counts** for it and
what an auditor must still **check by hand**; its evidence is a tuple of selectors (event types,
optionally narrowed by the event's data or actor), chosen by what the control asks, not by a
broad category: backups are counted from snapshots and restores, transfers from file transfers,
breach detection from failed logins, lockouts and chain breaks (never from successful logins).
Two controls of one framework never count the same set of events; where they share a type it
is because both texts ask for it (a test checks both).

**Exception rules** pick out events (or the absence of events) that an auditor must look at; an
exception belongs to every control that counts its event.

The report (``audit.reports``) lists each control's evidence and exceptions; a control with no
evidence in the period says "no evidence". It does not judge whether a control is "met": that
is the auditor's call.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from audit import catalogue

__all__ = [
    "ACCESS_TYPES",
    "EXCEPTION_RULES",
    "FRAMEWORKS",
    "NOT_EVIDENCE",
    "NO_VERIFICATION",
    "Control",
    "ExceptionRule",
    "Framework",
    "Selector",
    "counted_types",
]

# (event type, data, actor type) -> whether the event is evidence.
Predicate = Callable[[str, dict[str, Any], str], bool]


def _types(*names: str) -> frozenset[str]:
    unknown = [n for n in names if catalogue.get(n) is None]
    if unknown:
        raise ValueError(f"not catalogued: {unknown}")
    return frozenset(names)


@dataclass(frozen=True)
class Selector:
    """Events of ``types`` (any type when None) for which ``when`` holds (always when None)."""

    types: frozenset[str] | None
    when: Predicate | None = None
    note: str = ""  # how ``when`` narrows the types, for the docs and the report

    def matches(self, event_type: str, data: Callable[[], dict[str, Any]], actor: str) -> bool:
        if self.types is not None and event_type not in self.types:
            return False
        return self.when is None or self.when(event_type, data(), actor)

    def describe(self) -> str:
        types = "any event type" if self.types is None else ", ".join(sorted(self.types))
        return f"{types} ({self.note})" if self.note else types


@dataclass(frozen=True)
class Control:
    id: str
    title: str
    asks: str  # what the control asks of the system, in one sentence
    counted: tuple[Selector, ...]
    counts: str  # what the report counts for it, in one sentence
    manual: str  # what the auditor must still check by hand
    access_review: bool = False  # the report's access review section is evidence of it too

    @property
    def event_types(self) -> frozenset[str] | None:
        """Every type the control may count; None when a selector takes any type."""
        out: set[str] = set()
        for s in self.counted:
            if s.types is None:
                return None
            out |= s.types
        return frozenset(out)

    def counts_event(self, event_type: str, data: Callable[[], dict[str, Any]], actor: str) -> bool:
        return any(s.matches(event_type, data, actor) for s in self.counted)


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
    event_types: frozenset[str]
    match: Callable[[str, dict[str, Any]], str | None]


# --- Event sets, named once --------------------------------------------------------------------

LOGINS = _types("auth.logged_in", "auth.logged_out")
LOGIN_FAILURES = _types("auth.login_failed") | _types("auth.unknown_user_failed")
LOCKED = _types("auth.locked_out") | _types("auth.login_throttled")  # by account or address
LOCKOUTS = LOCKED | _types("auth.unlocked")
TOKEN_REFUSALS = _types("auth.token_rejected")
ACCOUNT_LIFECYCLE = _types(
    "user.created", "user.deactivated", "user.reactivated", "user.password_changed"
)
ROLE_CHANGES = _types("user.role_changed")
TOKENS = _types("token.created", "token.revoked")
ACCESS_TYPES = ACCOUNT_LIFECYCLE | ROLE_CHANGES | TOKENS  # folded by the access review
# Control-plane keys rotated and retired (key ids only), tokens moved to a new pepper.
KEYS = _types("key.rotated", "key.retired", "token.rehashed")
# The types of other apps' domains are counted through the evidence roles their definitions
# state (``catalogue.EVIDENCE_ROLES``): a type an app adds with a role is counted here with no
# change to this module.
CONSOLE = catalogue.with_role("console_session")
# Guest access: each request (recorded before the guest is asked) and its outcome.
TRANSFERS = catalogue.with_role("guest_transfer")
COMMANDS = catalogue.with_role("guest_command")
# Shareable links that open a guest's service to whoever holds them, until they expire.
PREVIEW_LINKS = catalogue.with_role("preview_link")
EXPORTS = _types("audit.exported") | _types("audit.export_downloaded")
LOG_READS = _types("audit.trail_read", "audit.accounts_listed")
# Catalogued types that nothing in the product appends yet (their ``not_appended``): no control
# counts them, so that no report presents as evidence what cannot occur (a test checks that the
# rest are appended).
NOT_EMITTED: dict[str, str] = {
    t.name: t.not_appended for t in catalogue.all_types() if t.not_appended
}
BACKUPS = catalogue.with_role("backup")
DATA_CHECKS = catalogue.with_role("integrity_check")
CHANGES = catalogue.types_for("change") - frozenset(NOT_EMITTED)
VERIFICATIONS = _types("audit.chain_verified")
DIGESTS = _types("audit.digest_signed")
# A break acknowledged by an administrator counts with the refusals: a known anomaly of the log.
REFUSALS = _types(
    "audit.export_refused",
    "audit.digest_signing_failed",
    "audit.break_acknowledged",
    "system.task_refused",  # the worker refused a task that is not one of the product's
)
CRASHES = catalogue.with_role("crash")
# What a VM's egress policy refused, and the names its resolver answered or refused, per period.
NET_EVIDENCE = catalogue.with_role("egress_evidence")
RETENTION = _types("audit.legal_hold_placed", "audit.legal_hold_released")

# Catalogued types that no control counts, and why (a test keeps this list honest).
NOT_EVIDENCE: dict[str, str] = {
    **{t.name: t.not_evidence for t in catalogue.all_types() if t.not_evidence},
    **{t: f"not appended by the product: {why}" for t, why in NOT_EMITTED.items()},
}


def _is_admin_grant(t: str, d: dict[str, Any], actor: str) -> bool:
    if t == "user.role_changed":
        return "admin" in (d.get("to"), d.get("from"))
    if t == "user.created":
        return d.get("role") == "admin" or bool(d.get("superuser"))
    return False


def _failed(t: str, d: dict[str, Any], actor: str) -> bool:
    return d.get("ok") is False


def _by_a_person(t: str, d: dict[str, Any], actor: str) -> bool:
    return actor in ("user", "anonymous")


def _s(types: frozenset[str] | None, when: Predicate | None = None, note: str = "") -> Selector:
    return Selector(types, when, note)


_FAILED_ONLY = "only failed verifications"

# --- Exceptions ---------------------------------------------------------------------------------


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


_VM_FAILED = frozenset(t for t in CHANGES if t.endswith("_failed"))

EXCEPTION_RULES: tuple[ExceptionRule, ...] = (
    ExceptionRule(
        "failed_login",
        "Failed login",
        LOGIN_FAILURES,
        lambda t, d: f"reason {d.get('reason', '?')}",
    ),
    ExceptionRule(
        "lockout",
        "Account or address locked out",
        LOCKED,
        lambda t, d: f"{d.get('failures', '?')} failures, locked until {d.get('until')}",
    ),
    ExceptionRule(
        "token_rejected",
        "API token rejected",
        TOKEN_REFUSALS,
        lambda t, d: f"token {d.get('token_id', '?')}: {d.get('reason', '?')}",
    ),
    ExceptionRule(
        "token_without_expiry",
        "API token without expiry",
        _types("token.created"),
        _token_without_expiry,
    ),
    ExceptionRule(
        "admin_granted",
        "Administrator rights granted",
        _types("user.role_changed", "user.created"),
        _admin_granted,
    ),
    ExceptionRule(
        "chain_verification_failed",
        "Chain verification failed",
        VERIFICATIONS,
        _verification_failed,
    ),
    ExceptionRule(
        "export_refused",
        "Export refused on a broken chain",
        _types("audit.export_refused"),
        lambda t, d: str(d.get("problem") or "export refused"),
    ),
    ExceptionRule(
        "break_acknowledged",
        "A break of the log acknowledged by an administrator",
        _types("audit.break_acknowledged"),
        lambda t, d: f"position {d.get('position')} ({d.get('kind')}): {d.get('reason')}",
    ),
    ExceptionRule(
        "vm_operation_failed",
        "VM operation failed",
        _VM_FAILED,
        lambda t, d: f"{t}: {d.get('reason') or d.get('error') or ''}".rstrip(": "),
    ),
    ExceptionRule(
        "vm_crashed",
        "VM crashed",
        CRASHES,
        lambda t, d: str(d.get("reason") or "VMM process gone"),
    ),
    ExceptionRule(
        "snapshot_corrupted",
        "Snapshot failed its manifest check",
        DATA_CHECKS,
        lambda t, d: json.dumps(d, sort_keys=True)[:200],
    ),
)
# Period-level exception: no chain verification ran in the period. It belongs to the controls
# that count chain verifications.
NO_VERIFICATION = ExceptionRule(
    "no_chain_verification",
    "No chain verification in the period",
    frozenset(),
    lambda t, d: "no audit.chain_verified event was recorded in the period",
)
RULES_BY_TYPE: dict[str, list[ExceptionRule]] = {}
for _rule in EXCEPTION_RULES:
    for _t in _rule.event_types:
        RULES_BY_TYPE.setdefault(_t, []).append(_rule)

_ADMIN = "only grants and removals of the admin role or superuser flag"
_REVIEW = (
    "Whether each grant was approved under the access policy (the log names who made it, not "
    "the approval ticket); that the users and tokens at period end (access review) are still "
    "needed."
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
                    "Logical access security software and infrastructure restrict access to "
                    "authenticated users.",
                    (_s(LOGINS | LOGIN_FAILURES | LOCKOUTS | TOKEN_REFUSALS),),
                    "Logins and logouts, failed logins, lockouts and unlocks, refused API tokens.",
                    "That every way in (dashboard, API, console) requires authentication: the log "
                    "shows outcomes, not the configuration.",
                ),
                Control(
                    "CC6.2",
                    "User registration and authorization",
                    "New users are registered and authorized before credentials are issued; "
                    "credentials are removed when access is no longer authorized.",
                    (_s(ACCOUNT_LIFECYCLE | TOKENS),),
                    "Accounts created, deactivated, reactivated and password changes; API tokens "
                    "issued (with expiry) and revoked.",
                    "The registration request and its approval for each account created; that "
                    "leavers' accounts were deactivated on time.",
                    access_review=True,
                ),
                Control(
                    "CC6.3",
                    "Role-based access; modification and removal",
                    "Access is authorized, modified or removed based on roles and least privilege.",
                    (_s(ROLE_CHANGES),),
                    "Role changes (and superuser changes), each with who made it.",
                    _REVIEW,
                    access_review=True,
                ),
                Control(
                    "CC6.7",
                    "Transmission, movement and removal of information",
                    "The movement of information to and from the system is restricted and "
                    "recorded.",
                    (_s(TRANSFERS | EXPORTS | PREVIEW_LINKS),),
                    "File transfers into and out of guests, each request and its outcome "
                    "(path, size, SHA-256, or why it failed); audit exports and their downloads; "
                    "shareable preview links to guests' services (port, expiry, who made them).",
                    "Transfers outside the product (guest network egress is in the network "
                    "events, not here); that each transfer was authorized.",
                ),
                Control(
                    "CC7.2",
                    "Monitoring of system components for anomalies",
                    "System components are monitored for anomalies indicative of attacks, "
                    "errors or malfunctions.",
                    (
                        _s(LOGIN_FAILURES | TOKEN_REFUSALS | LOCKED | REFUSALS),
                        _s(VERIFICATIONS),
                        _s(CRASHES),
                        _s(NET_EVIDENCE),
                    ),
                    "Anomalies: failed logins, lockouts, refused tokens and exports, VM crashes, "
                    "guest connections refused by egress policy and guest DNS lookups; every "
                    "chain verification (the monitoring that ran) with its result.",
                    "That someone reviewed the anomalies and acted on them.",
                ),
                Control(
                    "CC8.1",
                    "Change management",
                    "Changes to infrastructure and software are authorized, tested, approved "
                    "and implemented.",
                    (_s(CHANGES),),
                    "Every VM, network and quota change: the request, who made it, and its "
                    "outcome.",
                    "The approval of each change (the log shows who requested it); changes to "
                    "the product's own code and configuration, which are outside the log.",
                ),
            ),
        ),
        Framework(
            "iso27001",
            "ISO/IEC 27001:2022 Annex A",
            (
                Control(
                    "A.5.16",
                    "Identity management",
                    "The full life cycle of identities is managed.",
                    (_s(_types("user.created", "user.deactivated", "user.reactivated")),),
                    "Accounts created, deactivated and reactivated.",
                    "That each identity belongs to one person or service, and the joiner/leaver "
                    "records behind each change.",
                    access_review=True,
                ),
                Control(
                    "A.5.17",
                    "Authentication information",
                    "Allocation and management of authentication information is controlled.",
                    (_s(TOKENS | _types("user.password_changed") | KEYS),),
                    "API tokens issued (with expiry) and revoked; password changes; "
                    "control-plane keys (token peppers, the Django secret, digest keys) rotated "
                    "and retired, and tokens re-hashed with a new pepper.",
                    "The password policy and how secrets are handed over.",
                ),
                Control(
                    "A.5.18",
                    "Access rights",
                    "Access rights are provisioned, reviewed, modified and removed according to "
                    "policy.",
                    (_s(ROLE_CHANGES),),
                    "Role changes, each with who made it.",
                    _REVIEW,
                    access_review=True,
                ),
                Control(
                    "A.8.2",
                    "Privileged access rights",
                    "The allocation and use of privileged access rights is restricted and managed.",
                    (_s(ACCOUNT_LIFECYCLE | ROLE_CHANGES, _is_admin_grant, _ADMIN),),
                    "Admin role and superuser grants and removals.",
                    "That each administrator needs the role; the use of admin rights is in the "
                    "trail under each admin's name.",
                    access_review=True,
                ),
                Control(
                    "A.8.5",
                    "Secure authentication",
                    "Secure authentication technologies and procedures are implemented.",
                    (_s(LOGINS | LOGIN_FAILURES | LOCKOUTS | TOKEN_REFUSALS),),
                    "Logins and logouts, failed logins, lockouts and unlocks, refused API tokens.",
                    "The authentication configuration (password rules, lockout threshold, MFA "
                    "at the identity provider, if any).",
                ),
                Control(
                    "A.8.13",
                    "Information backup",
                    "Backup copies are taken and tested regularly.",
                    (_s(BACKUPS),),
                    "Snapshots taken, verified, found corrupted and deleted; snapshot and "
                    "restore outcomes.",
                    "That the snapshot schedule matches the backup policy and that restores "
                    "were tested; copies outside the product.",
                ),
                Control(
                    "A.5.14",
                    "Information transfer",
                    "Rules and procedures for information transfer are in place.",
                    (_s(TRANSFERS | EXPORTS | PREVIEW_LINKS),),
                    "File transfers into and out of guests (requests and outcomes); audit "
                    "exports and downloads; shareable preview links to guests' services.",
                    "The transfer rules themselves; transfers over the guests' own network.",
                ),
                Control(
                    "A.8.15",
                    "Logging",
                    "Logs of activities, exceptions and faults are produced, protected and "
                    "analysed.",
                    (_s(DIGESTS | VERIFICATIONS | LOG_READS | RETENTION),),
                    "Signed digests (protection), chain verifications and reads of the trail "
                    "(analysis), legal holds placed and released (retention).",
                    "That the digest keys are held outside the database and their fingerprints "
                    "pinned.",
                ),
                Control(
                    "A.8.16",
                    "Monitoring activities",
                    "Networks, systems and applications are monitored for anomalous behaviour.",
                    (
                        _s(LOGIN_FAILURES | TOKEN_REFUSALS | LOCKED | REFUSALS),
                        _s(VERIFICATIONS, _failed, _FAILED_ONLY),
                        _s(CRASHES),
                        _s(NET_EVIDENCE),
                    ),
                    "Anomalies: failed logins, lockouts, refused tokens and exports, failed "
                    "chain verifications, VM crashes, guest connections refused by egress "
                    "policy and guest DNS lookups.",
                    "That the anomalies were reviewed and acted on; monitoring outside the "
                    "product (metrics, alerts).",
                ),
                Control(
                    "A.8.32",
                    "Change management",
                    "Changes to information processing facilities are subject to change "
                    "management.",
                    (_s(CHANGES),),
                    "VM, network and quota changes with requester and outcome.",
                    "The approval of each change; changes to the product itself.",
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
                    "Allow access only to persons or software programs that have been granted "
                    "access rights.",
                    (_s(ROLE_CHANGES | TOKENS | TOKEN_REFUSALS),),
                    "Access rights granted and removed (roles, API tokens with scopes) and "
                    "refused uses of tokens.",
                    _REVIEW,
                    access_review=True,
                ),
                Control(
                    "164.312(b)",
                    "Audit controls",
                    "Mechanisms record and examine activity in systems that hold ePHI.",
                    (_s(DIGESTS | VERIFICATIONS | LOG_READS | EXPORTS),),
                    "Signed digests and chain verifications (the record), reads and exports of "
                    "the trail (its examination).",
                    "That the trail is examined at the frequency the policy sets.",
                ),
                Control(
                    "164.312(c)(1)",
                    "Integrity",
                    "ePHI is protected from improper alteration or destruction.",
                    (_s(VERIFICATIONS | DATA_CHECKS),),
                    "Chain verifications of the log; snapshot manifest checks (verified, "
                    "corrupted).",
                    "Integrity controls of the data inside the guests.",
                ),
                Control(
                    "164.312(d)",
                    "Person or entity authentication",
                    "Verify that a person or entity seeking access is the one claimed.",
                    (_s(LOGINS | LOGIN_FAILURES | TOKEN_REFUSALS),),
                    "Logins and logouts, failed logins, refused API tokens.",
                    "The strength of the authentication (passwords, MFA at the identity provider).",
                ),
                Control(
                    "164.308(a)(5)(ii)(C)",
                    "Log-in monitoring",
                    "Procedures for monitoring log-in attempts and reporting discrepancies.",
                    (_s(LOGIN_FAILURES | LOCKOUTS),),
                    "Failed logins, lockouts and unlocks (each failure is also an exception).",
                    "That the discrepancies were reported and followed up.",
                ),
                Control(
                    "164.312(e)(1)",
                    "Transmission security",
                    "Guard against unauthorized access to ePHI transmitted over a network.",
                    (_s(TRANSFERS | _types("audit.export_downloaded")),),
                    "File transfers into and out of guests (requests, and outcomes with size "
                    "and SHA-256) and downloads of audit exports.",
                    "That transport is encrypted (TLS in front of the product); guest network "
                    "traffic.",
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
                    "Changes to system components are made according to change procedures.",
                    (_s(CHANGES),),
                    "VM, network and quota changes with requester and outcome.",
                    "The change approval and testing records.",
                ),
                Control(
                    "7.2",
                    "Access is appropriately defined and assigned",
                    "Access to system components is assigned by job function and least privilege.",
                    (_s(ROLE_CHANGES | TOKENS),),
                    "Role changes; API tokens issued (with scopes, read-only flag, allowed "
                    "addresses) and revoked.",
                    _REVIEW,
                    access_review=True,
                ),
                Control(
                    "8.2",
                    "User identification and accounts are managed",
                    "User IDs are unique and managed through their whole life cycle.",
                    (_s(ACCOUNT_LIFECYCLE),),
                    "Accounts created, deactivated, reactivated and password changes.",
                    "That shared or generic accounts are not in use; that inactive accounts are "
                    "removed within 90 days (see the access review).",
                    access_review=True,
                ),
                Control(
                    "8.3",
                    "Strong authentication is established and managed",
                    "Strong authentication for users and administrators, with lockout after "
                    "repeated failures.",
                    (_s(LOGINS | LOGIN_FAILURES | LOCKOUTS | TOKEN_REFUSALS),),
                    "Logins, failed logins, lockouts and unlocks, refused API tokens.",
                    "The lockout threshold and duration in the settings; MFA.",
                ),
                Control(
                    "10.2",
                    "Audit logs capture user activity",
                    "Audit logs record individual user actions, access to the audit logs and "
                    "invalid access attempts.",
                    (_s(None, _by_a_person, "every event whose actor is a user or anonymous"),),
                    "Every event whose actor is a user or an anonymous caller, including reads "
                    "of the audit trail.",
                    "That the events carry what 10.2.2 asks (user, type, time, outcome, origin, "
                    "subject): see the evidence columns.",
                ),
                Control(
                    "10.3",
                    "Audit logs are protected from destruction and modification",
                    "Audit logs are protected from destruction and unauthorized modification.",
                    (_s(DIGESTS | VERIFICATIONS | RETENTION),),
                    "Signed digests and chain verifications with their results; legal holds "
                    "placed and released.",
                    "The database roles (the product's role cannot alter the audit tables) and "
                    "where digests are copied outside the database.",
                ),
                Control(
                    "10.4",
                    "Audit logs are reviewed to identify anomalies",
                    "Audit logs are reviewed to identify anomalies or suspicious activity.",
                    (_s(LOG_READS | EXPORTS),),
                    "Reads of the trail, exports of reports and bundles and their downloads.",
                    "That the review happened daily (10.4.1) and its findings were followed up.",
                ),
                Control(
                    "10.7",
                    "Failures of critical security control systems are detected",
                    "Failures of critical security control systems are detected and reported.",
                    (_s(VERIFICATIONS, _failed, _FAILED_ONLY), _s(REFUSALS)),
                    "Failed chain verifications, refused exports and digest-signing failures.",
                    "Failures of controls outside the product (firewalls, IDS, anti-malware).",
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
                    "Personal data is protected against unauthorised processing and against "
                    "loss, destruction or damage.",
                    (_s(TOKEN_REFUSALS | LOCKED | VERIFICATIONS | DATA_CHECKS),),
                    "Refused API tokens and lockouts (unauthorised access stopped); chain "
                    "verifications and snapshot checks (integrity).",
                    "Which guests hold personal data; encryption at rest.",
                ),
                Control(
                    "Art. 25",
                    "Data protection by design and by default",
                    "Only the personal data necessary for each purpose is processed, by default.",
                    (_s(ROLE_CHANGES | _types("token.created")),),
                    "Role changes and API tokens issued, with their scopes and expiry (tokens "
                    "without expiry are exceptions).",
                    "Data minimisation inside the guests; default settings of each workload.",
                    access_review=True,
                ),
                Control(
                    "Art. 30",
                    "Records of processing activities",
                    "A record of processing activities is maintained.",
                    (_s(TRANSFERS | COMMANDS | CONSOLE),),
                    "File transfers into and out of guests, commands in guests (each request "
                    "and its outcome) and console sessions.",
                    "The record of processing itself (purposes, categories, recipients): the "
                    "log shows the operations only.",
                ),
                Control(
                    "Art. 32",
                    "Security of processing",
                    "Confidentiality, integrity, availability and resilience, the ability to "
                    "restore, and regular testing.",
                    (_s(BACKUPS | CRASHES | VERIFICATIONS),),
                    "Snapshots and restores (ability to restore), crashes and recoveries "
                    "(resilience), chain verifications (regular testing).",
                    "The risk assessment behind the measures; encryption and pseudonymisation.",
                ),
                Control(
                    "Art. 33",
                    "Notification of a personal data breach (detection)",
                    "A personal data breach is detected, assessed and notified within 72 hours.",
                    (
                        _s(LOGIN_FAILURES | LOCKED | TOKEN_REFUSALS | REFUSALS),
                        _s(VERIFICATIONS, _failed, _FAILED_ONLY),
                    ),
                    "Signals to assess: failed logins, lockouts, refused tokens and exports, "
                    "broken chains. Successful logins are not counted.",
                    "Whether any signal was a breach, and the notification if so.",
                ),
            ),
        ),
    )
}


def counted_types() -> frozenset[str]:
    """Every catalogued type some control counts (a selector over any type counts them all
    only through its predicate, so it does not count here)."""
    out: set[str] = set()
    for framework in FRAMEWORKS.values():
        for control in framework.controls:
            for s in control.counted:
                if s.types is not None:
                    out |= s.types
    return frozenset(out)
