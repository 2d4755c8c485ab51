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

from collections.abc import Iterator

from audit import digests, sink
from audit.digests import ChainBroken
from audit.hashing import GENESIS_HASH
from audit.models import Digest, Event
from audit.verify import ChainProblem, verify_events

__all__ = ["ChainBroken", "check_range", "require_intact"]


def check_range(first: int = 1, last: int | None = None) -> ChainProblem | None:
    """The first problem that makes [first, last] (default: to the head) untrustworthy."""
    from audit.keys import KeyTrustError, trusted_public_keys
    from audit.store import head, iter_events

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
