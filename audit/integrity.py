"""What must hold before the server vouches for a range of the log (signing, exporting).

    from audit.integrity import ChainBroken, require_intact

    try:
        require_intact(first, last)
    except ChainBroken as exc:
        ...  # exc.problem: a ChainProblem (position, kind, detail) naming the break

``require_intact`` checks, in time proportional to the range and its digests (not the whole
log): the key history is trusted (``audit.keys``); every event of [first, last] hashes and
links to the one before it; the digests overlapping the range are signed by trusted keys,
chained and contiguous, and their end hashes are the stored ones; and the newest digest in the
database is the newest copy in the digest sink (a cut tail is found). ``audit.digests`` runs
the same checks before each signing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from django.db import connection

from audit import digests, sink
from audit.digests import ChainBroken
from audit.events import head, iter_events
from audit.hashing import GENESIS_HASH
from audit.keys import KeyTrustError, trusted_public_keys
from audit.models import Digest, Event
from audit.verify import ChainProblem, ChainReport, pg_rows, verify_events, verify_rows

__all__ = [
    "ChainBroken",
    "KnownBreak",
    "acknowledged_breaks",
    "check_range",
    "known_break",
    "require_intact",
    "require_no_known_break",
    "verify_store",
]


def verify_store(*, batch: int = 2000) -> ChainReport:
    """Verify the whole store, then every signed digest against it."""

    def find_hash(h: str) -> int | None:
        return Event.objects.filter(hash=h).values_list("position", flat=True).first()

    if connection.vendor == "postgresql":
        report = verify_rows(pg_rows(0, batch), find_hash=find_hash)
    else:

        def stream() -> Iterator[object]:
            for events in iter_events(0, batch=batch):
                yield from events

        report = verify_events(stream(), find_hash=find_hash)
    if not report.ok:
        return report
    problem = digests.check_all(report.last_position)
    report.digests_checked = digests.count()
    if problem is not None:
        report.problem = problem
    return report


def check_range(first: int = 1, last: int | None = None) -> ChainProblem | None:
    """The first problem that makes [first, last] (default: to the head) untrustworthy."""
    try:
        public_keys = trusted_public_keys()
    except KeyTrustError as exc:
        return ChainProblem(0, "key", f"untrusted digest key history: {exc}")
    head_position, _ = head()
    last = head_position if last is None else last
    first = max(first, 1)
    if last > head_position:
        return ChainProblem(head_position + 1, "missing", f"the log ends at {head_position}")

    if first == 1:
        prev_hash = GENESIS_HASH
    else:
        found = Event.objects.filter(position=first - 1).values_list("hash", flat=True).first()
        if found is None:
            return ChainProblem(first - 1, "missing", f"position {first - 1} is absent")
        prev_hash = found

    def stream() -> Iterator[object]:
        for batch in iter_events(first - 1, until=last, batch=5000):
            yield from batch

    report = verify_events(stream(), start_position=first, start_prev_hash=prev_hash)
    if report.problem is not None:
        return report.problem
    if report.last_position != last:
        return ChainProblem(report.last_position + 1, "missing", "the range has a gap")

    overlapping = list(
        Digest.objects.filter(end_position__gte=first - 1, start_position__lte=last + 1).order_by(
            "start_position", "end_position", "sequence"
        )
    )
    if overlapping:
        before = (
            Digest.objects.filter(end_position__lt=overlapping[0].start_position)
            .order_by("-start_position", "-end_position", "-sequence")
            .first()
        )
        if before is None and overlapping[0].start_position > 1:
            return ChainProblem(
                overlapping[0].start_position - 1,
                "digest",
                f"no digest signs the positions before {overlapping[0].start_position}: "
                "digests were removed",
            )
        problem = digests.check_digests(
            overlapping, last_position=head_position, previous=before, public_keys=public_keys
        )
        if problem is not None:
            return problem
        ends = {d.end_position: d.end_hash for d in overlapping if d.end_position >= 1}
        stored = dict(Event.objects.filter(position__in=list(ends)).values_list("position", "hash"))
        for position, end_hash in sorted(ends.items()):
            if stored.get(position) != end_hash:
                return ChainProblem(
                    position, "digest", "the event's hash differs from the signed digest"
                )
    try:
        readable, newest = sink.newest_of(sink.configured())
    except sink.SinkError as exc:
        return ChainProblem(0, "digest", f"the digest sink cannot be read: {exc}")
    if readable:
        return digests.sink_continuity(digests.last_digest(), newest)
    return None


def require_intact(first: int = 1, last: int | None = None) -> None:
    """Raise ``ChainBroken`` naming the break when [first, last] cannot be vouched for."""
    problem = check_range(first, last)
    if problem is not None:
        raise ChainBroken(problem)


# --- A break on record ------------------------------------------------------------------------
#
# Checking a range finds a break inside it only. Once any check has found one (a verification
# failed, an export or a signing was refused over it), the whole log is known to be broken: every
# export and every digest is refused, naming that break, until a full verification passes again
# or an administrator acknowledges that very break (``audit.break_acknowledged``, with who and
# why; every report made afterwards states it).

BREAK_TYPES = ("audit.chain_verified", "audit.export_refused", "audit.digest_signing_failed")
CLEARING_TYPES = ("audit.chain_verified", "audit.break_acknowledged")
_PROBLEM = re.compile(r"position (\d+): ([a-z_]+): ")


@dataclass(frozen=True)
class KnownBreak:
    """A break the log has on record: the event that recorded it and the problem it named."""

    event_position: int
    event_type: str
    position: int
    kind: str
    problem: str

    @property
    def key(self) -> tuple[int, str]:
        return (self.position, self.kind)

    def chain_problem(self) -> ChainProblem:
        detail = self.problem
        if (m := _PROBLEM.search(detail)) is not None:
            detail = detail[m.end() :]
        # The problem as first recorded, so that every refusal names it in the same words.
        return ChainProblem(self.position, self.kind, detail)


def _break_of(position: int, event_type: str, data: dict[str, Any]) -> KnownBreak | None:
    """The break an event records, or None when it records none."""
    if event_type == "audit.chain_verified":
        if data.get("ok") is not False:
            return None
        text = str(data.get("problem") or "")
    elif event_type == "audit.digest_signing_failed":
        if data.get("reason") != "chain_broken":
            return None
        text = str(data.get("detail") or "")
    elif event_type == "audit.export_refused":
        text = str(data.get("problem") or "")
    else:
        return None
    m = _PROBLEM.search(text)
    where, kind = (int(m.group(1)), m.group(2)) if m else (0, "unknown")
    return KnownBreak(position, event_type, where, kind, text[:2000])


def _since_last_clean() -> list[tuple[int, str, dict[str, Any]]]:
    """The break and acknowledgement events after the newest clean full verification."""
    clean = 0
    rows = (
        Event.objects.filter(type="audit.chain_verified")
        .order_by("-position")
        .values_list("position", "data")
    )
    for position, data in rows.iterator(chunk_size=50):
        if json.loads(data).get("ok") is True:
            clean = position
            break
    later = (
        Event.objects.filter(position__gt=clean, type__in=BREAK_TYPES + CLEARING_TYPES)
        .order_by("position")
        .values_list("position", "type", "data")
    )
    return [(p, t, json.loads(d)) for p, t, d in later.iterator(chunk_size=500)]


def known_break() -> KnownBreak | None:
    """The first break on record that no later clean full verification settled and no
    administrator acknowledged; None when the log is not known to be broken."""
    acknowledged: set[tuple[int, str]] = set()
    breaks: list[KnownBreak] = []
    for position, event_type, data in _since_last_clean():
        if event_type == "audit.break_acknowledged":
            acknowledged.add((int(data.get("position", -1)), str(data.get("kind", ""))))
        elif (found := _break_of(position, event_type, data)) is not None:
            breaks.append(found)
    # The first open break: later refusals over it name it again and do not change it.
    open_breaks = [b for b in breaks if b.key not in acknowledged]
    return open_breaks[0] if open_breaks else None


def acknowledged_breaks() -> list[dict[str, Any]]:
    """Every break an administrator acknowledged, oldest first (reports state them)."""
    rows = (
        Event.objects.filter(type="audit.break_acknowledged")
        .order_by("position")
        .values_list("position", "event_id", "recorded_at", "actor_name", "data")
    )
    out = []
    for position, event_id, recorded_at, actor, data in rows:
        d = json.loads(data)
        out.append(
            {
                "event_position": position,
                "event_id": str(event_id),
                "recorded_at": recorded_at.isoformat(),
                "acknowledged_by": actor,
                "position": d.get("position"),
                "kind": d.get("kind"),
                "problem": d.get("problem"),
                "reason": d.get("reason"),
            }
        )
    return out


def require_no_known_break() -> None:
    """Raise ``ChainBroken`` naming the break on record (see ``known_break``)."""
    found = known_break()
    if found is not None:
        raise ChainBroken(found.chain_problem())
