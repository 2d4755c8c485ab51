"""Actions on the audit log itself; each leaves an event of its own."""

from __future__ import annotations

import json
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from audit import digests, projections, sink, store
from audit.actor import Actor
from audit.models import Digest, Event
from audit.verify import ChainReport, verify_store


def _actor(who: Any) -> Actor:
    if isinstance(who, Actor):
        return who
    return Actor.from_request(who)


def verify_chain(who: Any) -> ChainReport:
    """Verify the chain and digests, and record the outcome (auditors rely on the history).

    When the tail was cut, the outcome is recorded after the last position a digest (in the
    database or the sink) signed: giving a cut position to a new event would cover the cut.
    """
    report = verify_store()
    store.append(
        "audit",
        "chain",
        "audit.chain_verified",
        {
            "ok": report.ok,
            "checked": report.checked,
            "last_position": report.last_position,
            "digests_checked": report.digests_checked,
            "problem": str(report.problem) if report.problem else None,
        },
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
        "detail": detail[:2000],
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
