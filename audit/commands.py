"""Actions on the audit log itself; each leaves an event of its own."""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction

from audit import digests, integrity, keys, projections, retention, signing, sink, store
from audit.actor import Actor
from audit.integrity import verify_store
from audit.models import Digest, Event, ExportJob
from audit.verify import ChainReport
from core import keyfiles


def _actor(who: Any) -> Actor:
    if isinstance(who, Actor):
        return who
    return Actor.from_request(who)


def verify_chain(who: Any, *, since_bundle: str | None = None) -> ChainReport:
    """Verify the chain and digests, and record the outcome (auditors rely on the history).

    ``since_bundle``: the path of an earlier evidence bundle whose digests the log must still
    hold (``audit.digests.check_against_bundle``). When the tail was cut, the outcome is recorded
    after the last position a digest (in the database or the sink) signed: giving a cut position
    to a new event would cover the cut.
    """
    report = verify_store()
    if report.ok and since_bundle is not None:
        report.problem = digests.check_against_bundle(since_bundle)
    data: dict[str, Any] = {
        "ok": report.ok,
        "checked": report.checked,
        "last_position": report.last_position,
        "digests_checked": report.digests_checked,
        "problem": safe_text(report.problem, 2000) if report.problem else None,
    }
    if since_bundle is not None:
        data["since_bundle"] = safe_text(os.path.basename(since_bundle))
    store.append(
        "audit",
        "chain",
        "audit.chain_verified",
        data,
        actor=_actor(who),
        not_before=digests.vouched_end() + 1,
    )
    return report


def sign_digest(
    who: Any, *, max_events: int | None = None, scheduled: bool = False
) -> Digest | None:
    """Sign a digest over the events since the last one, and record it.

    ``scheduled``: the worker's minutely signing, which signs even when idle and records no
    event of its own on success (the digest row and its copy in the sink are the record; an
    event per minute would leave the log always one event ahead of its newest digest). Any
    failure is recorded (``audit.digest_signing_failed``, naming the break for a broken chain)
    and raised; the worker records a repeated failure once until a digest succeeds.
    """
    try:
        # A break already on record stops all signing, not only one inside the new range.
        integrity.require_no_known_break()
        digest = digests.sign_pending(max_events=max_events, idle=scheduled)
    except digests.ChainBroken as exc:
        _record_signing_failure(who, "chain_broken", str(exc), exc.problem, scheduled)
        raise
    except (ImproperlyConfigured, sink.SinkError, OSError) as exc:
        reason = "sink" if isinstance(exc, sink.SinkError) else "configuration"
        _record_signing_failure(who, reason, str(exc), None, scheduled)
        raise
    if digest is not None and not scheduled:
        store.append(
            "audit",
            "digests",
            "audit.digest_signed",
            {
                "start_position": digest.start_position,
                "end_position": digest.end_position,
                "end_hash": digest.end_hash,
                "key_id": digest.key_id,
                "algorithm": digest.algorithm,
                "sequence": digest.sequence,
            },
            actor=_actor(who),
        )
    return digest


def _record_signing_failure(
    who: Any, reason: str, detail: str, problem: Any, scheduled: bool
) -> None:
    data = {
        "reason": reason,
        "detail": safe_text(detail, 2000),
        "position": problem.position if problem is not None else None,
        "kind": problem.kind if problem is not None else None,
    }
    if scheduled:
        last = Event.objects.filter(type="audit.digest_signing_failed").order_by("-position")
        previous = last.values_list("position", "data").first()
        newest = digests.last_digest()
        if (
            previous is not None
            and previous[0] > (newest.end_position if newest else 0)
            and json.loads(previous[1]).get("detail") == data["detail"]
        ):
            return  # the same failure, already recorded, and no digest since
    store.append(
        "audit",
        "digests",
        "audit.digest_signing_failed",
        data,
        actor=_actor(who),
        not_before=digests.vouched_end() + 1,
    )


def acknowledge_break(who: Any, *, position: int, kind: str, reason: str) -> dict[str, Any]:
    """Record that an administrator knows of the break on record at (position, kind) and why
    the log may be used past it (``audit.break_acknowledged``). Exports and signing go on; the
    range holding the break still cannot be exported, and every later report states the
    acknowledgement. ``LookupError`` when no such break is open, ``ValueError`` for a reason
    that is unfit."""
    reason = clean_reason(reason)
    if len(reason) < 10:
        raise ValueError("say why, in at least 10 characters")
    with transaction.atomic():
        store.lock()  # the break looked up is the one acknowledged
        found = integrity.known_break()
        if found is None or found.key != (position, kind):
            current = f"; the break on record is {found.chain_problem()}" if found else ""
            raise LookupError(f"no open break on record at position {position} ({kind}){current}")
        data = {
            "position": position,
            "kind": kind,
            "problem": found.problem,
            "recorded_by_event": found.event_position,
            "reason": reason,
        }
        store.append("audit", "chain", "audit.break_acknowledged", data, actor=_actor(who))
    return data


def rebuild_projection(who: Any, name: str) -> int:
    count = projections.rebuild(name)
    store.append(
        "audit",
        f"projection:{name}"[:64],
        "audit.projection_rebuilt",
        {"projection": name, "events": count},
        actor=_actor(who),
    )
    return count


# --- What auditors do, and retention (docs/audit-exports.md) ----------------------------------


def _no_body(who: Any) -> bool:
    # A HEAD request is answered with headers only: nothing was read or downloaded.
    return getattr(who, "method", None) == "HEAD"


def record_trail_read(who: Any, what: str, details: dict[str, Any]) -> None:
    """One event per request that reads the trail (PCI DSS 10.2.1.3), appended before the answer
    is sent: a read the log cannot record is not served. Followers that push events (live
    updates) record nothing per push: the connection's catch-up is the read. A HEAD request
    (no body sent) records nothing."""
    if _no_body(who):
        return
    store.append("audit", "trail", "audit.trail_read", {"what": what, **details}, actor=_actor(who))


def record_accounts_listed(who: Any, what: str, details: dict[str, Any]) -> None:
    if _no_body(who):
        return
    store.append(
        "audit", "accounts", "audit.accounts_listed", {"what": what, **details}, actor=_actor(who)
    )


def record_export_downloaded(who: Any, job: Any) -> None:
    """A finished export's file is sent (GET); a HEAD request, which sends none, is not."""
    if _no_body(who):
        return
    store.append(
        "audit",
        "exports",
        "audit.export_downloaded",
        {
            "job": str(job.id),
            "kind": job.kind,
            "format": job.format,
            "file": job.file_name,
            "sha256": job.sha256,
            "size": job.size,
        },
        actor=_actor(who),
    )


def record_export_refused(who: Any, data: dict[str, Any]) -> None:
    data = {**data, "problem": safe_text(data.get("problem", ""), 2000)}
    store.append("audit", "exports", "audit.export_refused", data, actor=_actor(who))


@transaction.atomic
def record_export_finished(who: Any, job_id: Any, data: dict[str, Any]) -> None:
    """An export's file is written: ``audit.exported`` and the job marked done, together."""
    store.append("audit", "exports", "audit.exported", data, actor=_actor(who))
    ExportJob.objects.filter(pk=job_id).update(
        status=ExportJob.Status.DONE,
        finished_at=datetime.now(UTC),
        processed=data["events"],
        total=data["events"],
        sha256=data["sha256"],
        size=data["size"],
        first_position=data["first_position"],
        last_position=data["last_position"],
    )


def place_legal_hold(who: Any, reason: str) -> str:
    """Place a hold on the whole log; returns its id. Nothing is deleted while any hold is
    active (and the product deletes nothing at all: see ``audit.retention``)."""
    reason = clean_reason(reason)
    if not reason:
        raise ValueError("a reason of 1 to 500 characters is required")
    hold_id = uuid.uuid4().hex[:12]
    store.append(
        "audit",
        "retention",
        "audit.legal_hold_placed",
        {"hold_id": hold_id, "reason": reason, "scope": "all events"},
        actor=_actor(who),
    )
    return hold_id


def release_legal_hold(who: Any, hold_id: str, reason: str = "") -> bool:
    """Release an active hold; False when no such hold is active (nothing is recorded).
    ``ValueError`` for a reason that is not text of up to 500 characters."""
    reason = clean_reason(reason)
    with transaction.atomic():
        store.lock()  # the check and the release are one step against concurrent releases
        active = {h.hold_id for h in retention.legal_holds() if h.active}
        if hold_id not in active:
            return False
        store.append(
            "audit",
            "retention",
            "audit.legal_hold_released",
            {"hold_id": hold_id, "reason": reason},
            actor=_actor(who),
        )
    return True


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def has_control(text: str) -> bool:
    """Whether ``text`` holds a control character (NUL, newline, escape...)."""
    return _CONTROL.search(text) is not None


def safe_text(value: Any, limit: int = 200) -> str:
    """``value`` as bounded text an event can hold: control characters written as ``\\xNN``
    escapes, never stored raw (the store refuses NUL; the others forge lines in logs and
    reports). Callers validate input first; this is the last line for what still gets here."""
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)[:limit]


def clean_reason(reason: Any, limit: int = 500) -> str:
    """A free-text reason typed by a person, stripped; ``ValueError`` when it is longer than
    ``limit`` or holds control characters other than line breaks and tabs."""
    text = str(reason or "").strip()
    if len(text) > limit:
        raise ValueError(f"a reason of at most {limit} characters is required")
    if has_control(text.replace("\n", "").replace("\r", "").replace("\t", "")):
        raise ValueError("the reason must not hold control characters")
    return text


def read_details(filters: Mapping[str, Any], rows: Any) -> dict[str, Any]:
    """What a trail read asked for and got: its filters and the positions returned.

    ``filters``: the validated filters the view applied (a form's or filter set's cleaned
    data), never the raw query string: unknown parameters are not recorded, and what is
    recorded is bounded text without control characters.
    """
    recorded = {
        str(k)[:40]: safe_text(v)
        for k, v in list(filters.items())[:20]
        if v not in (None, "") and not isinstance(v, list | tuple | dict)
    }
    positions = [r["position"] if isinstance(r, dict) else r.position for r in rows]
    return {
        "filters": recorded,
        "returned": len(positions),
        "first_position": min(positions) if positions else None,
        "last_position": max(positions) if positions else None,
    }


def record_task_refused(data: dict[str, Any]) -> None:
    """The worker refused a task that is not one of the product's (the worker's task guard)."""
    store.append(
        "system", "worker", "system.task_refused", data, actor=Actor.system(channel="worker")
    )


# --- Control-plane keys (docs/security.md, "Key rotation") ---------------------------------------


class KeyRotationRefused(Exception):
    """A rotation or retirement that would break what exists, or that this host cannot make."""


def _record_key(who: Any, event_type: str, kind: str, data: dict[str, Any]) -> None:
    store.append("key", kind, event_type, {"kind": kind, **data}, actor=_actor(who))


def _secrets_dir() -> Path:
    return Path(settings.SANDBOX_SECRETS_DIR)


def rotate_key_file(who: Any, kind: keyfiles.Kind) -> tuple[str, str]:
    """Generate the next version of a file-kept key and record ``key.rotated``: (previous key
    id, new key id). Processes take the new version as current when they restart; until the
    old version is retired, what it hashed or signed is still accepted."""
    directory = _secrets_dir()
    known = set(keyfiles.load(kind, directory, os.environ))
    previous = kind.key_id(max(known))
    version = keyfiles.create_next(kind, directory, os.environ)
    try:
        _record_key(
            who,
            "key.rotated",
            kind.name,
            {"key_id": kind.key_id(version), "previous_key_id": previous, "restart": True},
        )
    except BaseException:
        keyfiles.remove(kind, directory, version)  # unrecorded, so never used
        raise
    return previous, kind.key_id(version)


def retire_key_file(
    who: Any, kind: keyfiles.Kind, key_id: str, *, in_use: int = 0, force: bool = False
) -> None:
    """Delete a former version of a file-kept key and record ``key.retired``.

    Refused for the current version, for one the environment gives (remove it there), and, unless
    ``force``, while ``in_use`` things still depend on it alone.
    """
    version = kind.version_of(key_id)
    directory = _secrets_dir()
    versions = keyfiles.load(kind, directory, os.environ)
    if version is None or version not in versions:
        known = ", ".join(kind.key_id(v) for v in sorted(versions))
        raise KeyRotationRefused(f"{kind.name} has no key {key_id!r} (it has {known})")
    if version == max(versions):
        raise KeyRotationRefused(f"{key_id} is the current {kind.name}: rotate first")
    if version in keyfiles.env_versions(kind, os.environ):
        raise KeyRotationRefused(
            f"{kind.name} {key_id} comes from the environment: remove it there and restart"
        )
    if in_use and not force:
        raise KeyRotationRefused(
            f"{in_use} still depend on {kind.name} {key_id}: they stop working when it is "
            "retired (--force to retire it all the same)"
        )
    with transaction.atomic():
        _record_key(who, "key.retired", kind.name, {"key_id": key_id, "still_in_use": in_use})
        keyfiles.remove(kind, directory, version)


def rotate_digest_key(who: Any) -> tuple[str, str]:
    """Rotate the key that signs digests (of ``SANDBOX_DIGEST_ALGORITHM``): (previous, new)."""
    if settings.SANDBOX_DIGEST_ALGORITHM == signing.HMAC_SHA256:
        return rotate_key_file(who, keyfiles.DIGEST_HMAC)

    def record(previous: str, new: str) -> None:
        _record_key(who, "key.rotated", "digest-key", {"key_id": new, "previous_key_id": previous})

    try:
        previous, new = keys.rotate(record)
    except ImproperlyConfigured as exc:
        raise KeyRotationRefused(str(exc)) from exc
    return previous, new


def retire_digest_key(who: Any, key_id: str) -> None:
    """Retire a former digest key. An Ed25519 key loses its private half only, so what it signed
    stays verifiable; an HMAC key that signed a digest is refused (verifying needs the key)."""
    if keys.NUMBERED_ID_RE.fullmatch(key_id) or key_id in keys.configured_public_keys():
        try:
            with transaction.atomic():
                _record_key(who, "key.retired", "digest-key", {"key_id": key_id})
                keys.retire(key_id)
        except ImproperlyConfigured as exc:
            raise KeyRotationRefused(str(exc)) from exc
        return
    signed = Digest.objects.filter(key_id=key_id).count()
    if signed:
        raise KeyRotationRefused(
            f"{signed} digests are signed with the HMAC key {key_id}: they could no longer be "
            "verified without it (Ed25519 digest keys can be retired: their public half stays)"
        )
    retire_key_file(who, keyfiles.DIGEST_HMAC, key_id)
