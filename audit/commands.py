"""Actions on the audit log itself; each leaves an event of its own."""

from __future__ import annotations

from typing import Any

from audit import digests, projections, store
from audit.actor import Actor
from audit.models import Digest
from audit.verify import ChainReport, verify_store


def _actor(who: Any) -> Actor:
    if isinstance(who, Actor):
        return who
    return Actor.from_request(who)


def verify_chain(who: Any) -> ChainReport:
    """Verify the chain and digests, and record the outcome (auditors rely on the history)."""
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
    )
    return report


def sign_digest(who: Any, *, max_events: int | None = None) -> Digest | None:
    digest = digests.sign_pending(max_events=max_events)
    if digest is not None:
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
            },
            actor=_actor(who),
        )
    return digest


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
