"""Chain verification: recompute every hash and link, and check the signed digests.

Reports the first bad position and what is wrong with it:
- ``altered``: the row's content no longer matches its own hash;
- ``missing``: a position is absent, or the row's predecessor is gone from the chain;
- ``reordered``: the row links to an event that stands elsewhere in the log;
- ``inserted``: a row that the next event's link skips over;
- ``digest``: a signed digest does not match the chain (or the tail was cut off).

The loops only; the whole store and its digests together: ``audit.integrity.verify_store``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from django.db import connection

from audit.hashing import GENESIS_HASH, HASHED_FIELDS, hash_input, render_fields

__all__ = ["ChainProblem", "ChainReport", "pg_rows", "verify_events", "verify_rows"]


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


# A row as the verification loop reads it: position, prev_hash, hash, data, then the
# HASHED_FIELDS values already rendered as strings (see ``audit.hashing.hash_input``).
Row = tuple


def _rows_of(events: Iterable[object]) -> Iterator[Row]:
    for event in events:
        f = event.hashed_fields()  # type: ignore[attr-defined]
        yield (f["position"], f["prev_hash"], f["hash"], f["data"], *render_fields(f))


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
    return verify_rows(
        _rows_of(events),
        start_position=start_position,
        start_prev_hash=start_prev_hash,
        find_hash=find_hash,
    )


def verify_rows(
    rows: Iterable[Row],
    *,
    start_position: int = 1,
    start_prev_hash: str = GENESIS_HASH,
    find_hash: Callable[[str], int | None] | None = None,
) -> ChainReport:
    """Verify rows (see ``Row``) in position order: each row's position is the next one, its
    link is the previous row's hash, and its hash is the SHA-256 of its content and link.

    The loop does exactly these three checks per row; the first row that fails one of them is
    diagnosed (``_diagnose``) and ends the walk.
    """
    sha256 = hashlib.sha256
    expected = start_position
    last_hash = start_prev_hash
    before_prev_hash: str | None = None  # the hash two links back, to spot an inserted row
    problem: ChainProblem | None = None
    for row in rows:
        if (
            row[0] == expected
            and row[1] == last_hash
            and sha256(hash_input(row[4:], row[3], row[1])).hexdigest() == row[2]
        ):
            before_prev_hash = last_hash
            last_hash = row[2]
            expected += 1
            continue
        # Stop reading before diagnosing: ``find_hash`` may query the same connection.
        close = getattr(rows, "close", None)
        if close is not None:
            close()
        problem = _diagnose(row, expected, last_hash, before_prev_hash, find_hash)
        break
    report = ChainReport(
        checked=expected - start_position, last_position=expected - 1, last_hash=last_hash
    )
    report.problem = problem
    return report


def _diagnose(
    row: Row,
    expected: int,
    last_hash: str,
    before_prev_hash: str | None,
    find_hash: Callable[[str], int | None] | None,
) -> ChainProblem:
    """What is wrong with the first row that failed a check."""
    position, prev_hash = row[0], row[1]
    content_ok = hashlib.sha256(hash_input(row[4:], row[3], prev_hash)).hexdigest() == row[2]
    if position != expected:
        return ChainProblem(
            expected, "missing", f"position {expected} is absent (next present is {position})"
        )
    if prev_hash != last_hash:
        if content_ok and before_prev_hash is not None and prev_hash == before_prev_hash:
            return ChainProblem(
                position - 1,
                "inserted",
                f"position {position - 1} is not linked by position {position}: "
                "a row was inserted before it",
            )
        if content_ok and find_hash is not None and (where := find_hash(prev_hash)):
            return ChainProblem(
                position,
                "reordered",
                f"this event follows the event now at position {where}, "
                f"not the one at position {position - 1}",
            )
        if content_ok:
            return ChainProblem(
                position,
                "missing",
                f"the event this one follows is gone (expected previous hash "
                f"{last_hash[:16]}…, link names {prev_hash[:16]}…)",
            )
        return ChainProblem(position, "altered", "content and link do not match the stored hash")
    return ChainProblem(position, "altered", "the stored content does not match its hash")


# PostgreSQL renders each hashed column as the text the header holds (the same strings as
# ``render_fields``: a UUID in its canonical form, integers in decimal, the time in UTC with
# microseconds), so the loop only escapes, joins and hashes. Tested against ``render_fields``.
_PG_TEXT = {
    "event_id": "event_id::text",
    "version": "version::text",
    "schema_version": "schema_version::text",
    "recorded_at": (
        "to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')"
    ),
}
PG_ROWS_SQL = (  # built from the constant column list only
    "SELECT position, prev_hash, hash, data, "  # noqa: S608
    + ", ".join(f"COALESCE({_PG_TEXT.get(name, name)}, '')" for name in HASHED_FIELDS)
    + " FROM audit_event WHERE position > %s ORDER BY position"
)


def pg_rows(after: int, batch: int) -> Iterator[Row]:
    """Every event after ``after``, in one query (one snapshot), ``batch`` rows at a time.

    Outside a transaction the rows stream (libpq's chunked rows: the server produces the next
    rows while this process hashes), and closing the generator early cancels the query. Inside
    the caller's transaction a cancel would abort it, so there a server-side cursor fetches
    the batches instead.
    """
    connection.ensure_connection()
    raw = connection.connection
    with connection.wrap_database_errors:
        if connection.in_atomic_block:
            with raw.cursor(name="audit_verify_rows") as cur:
                cur.itersize = batch
                cur.execute(PG_ROWS_SQL, [after])
                while rows := cur.fetchmany(batch):
                    yield from rows
        else:
            with raw.cursor() as cur:
                yield from cur.stream(PG_ROWS_SQL, [after], size=batch)
