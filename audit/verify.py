"""Chain verification: recompute every hash and link, and check the signed digests.

Reports the first bad position and what is wrong with it:
- ``altered``: the row's content no longer matches its own hash;
- ``missing``: a position is absent, or the row's predecessor is gone from the chain;
- ``reordered``: the row links to an event that stands elsewhere in the log;
- ``inserted``: a row that the next event's link skips over;
- ``digest``: a signed digest does not match the chain (or the tail was cut off).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from audit.hashing import GENESIS_HASH, event_hash

__all__ = ["ChainProblem", "ChainReport", "verify_events"]


@dataclass(frozen=True)
class ChainProblem:
    position: int
    kind: str  # altered, missing, reordered, inserted, digest
    detail: str

    def __str__(self) -> str:
        return f"position {self.position}: {self.kind}: {self.detail}"


@dataclass
class ChainReport:
    checked: int = 0
    last_position: int = 0
    last_hash: str = GENESIS_HASH
    problem: ChainProblem | None = None
    digests_checked: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


def _content_ok(fields: dict) -> bool:
    return event_hash(fields, fields["data"], fields["prev_hash"]) == fields["hash"]


def verify_events(
    events: Iterable[object],
    *,
    start_position: int = 1,
    start_prev_hash: str = GENESIS_HASH,
    find_hash: Callable[[str], int | None] | None = None,
) -> ChainReport:
    """Verify a stream of events (objects with ``hashed_fields()``) in position order.

    ``find_hash(h)`` returns the position of the event whose hash is ``h``, or None; it lets a
    broken link be told apart as reordered (the link target stands elsewhere) or missing.
    """
    report = ChainReport(last_position=start_position - 1, last_hash=start_prev_hash)
    before_prev_hash: str | None = None  # the hash two links back, to spot an inserted row
    for event in events:
        f = event.hashed_fields()  # type: ignore[attr-defined]
        position = f["position"]
        expected = report.last_position + 1
        content_ok = _content_ok(f)
        if position != expected:
            report.problem = ChainProblem(
                expected,
                "missing",
                f"position {expected} is absent (next present is {position})",
            )
            return report
        if f["prev_hash"] != report.last_hash:
            if content_ok and before_prev_hash is not None and f["prev_hash"] == before_prev_hash:
                report.problem = ChainProblem(
                    position - 1,
                    "inserted",
                    f"position {position - 1} is not linked by position {position}: "
                    "a row was inserted before it",
                )
            elif content_ok and find_hash is not None and (where := find_hash(f["prev_hash"])):
                report.problem = ChainProblem(
                    position,
                    "reordered",
                    f"this event follows the event now at position {where}, "
                    f"not the one at position {position - 1}",
                )
            elif content_ok:
                report.problem = ChainProblem(
                    position,
                    "missing",
                    f"the event this one follows is gone (expected previous hash "
                    f"{report.last_hash[:16]}…, link names {f['prev_hash'][:16]}…)",
                )
            else:
                report.problem = ChainProblem(
                    position, "altered", "content and link do not match the stored hash"
                )
            return report
        if not content_ok:
            report.problem = ChainProblem(
                position, "altered", "the stored content does not match its hash"
            )
            return report
        before_prev_hash = report.last_hash
        report.last_hash = f["hash"]
        report.last_position = position
        report.checked += 1
    return report


def verify_store(*, batch: int = 5000) -> ChainReport:
    """Verify the whole store, then every signed digest against it."""
    from audit import digests
    from audit.models import Event
    from audit.store import iter_events

    def stream() -> Iterator[object]:
        for events in iter_events(0, batch=batch):
            yield from events

    def find_hash(h: str) -> int | None:
        return Event.objects.filter(hash=h).values_list("position", flat=True).first()

    report = verify_events(stream(), find_hash=find_hash)
    if not report.ok:
        return report
    problem = digests.check_all(report.last_position)
    report.digests_checked = digests.count()
    if problem is not None:
        report.problem = problem
    return report
