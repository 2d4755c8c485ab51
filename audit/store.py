"""Appending to and reading from the event store.

Appends are serialized: on PostgreSQL a transaction-level advisory lock that every append takes
(readers go on; a lock timeout turns into ``EventStoreUnavailable``), on SQLite the write lock
that an IMMEDIATE transaction takes at BEGIN. Under that lock the next position is the last one
plus one, so positions are gap-free and commit order equals position order: a reader that tails
by position never skips a late commit. The per-aggregate version is checked under the same lock
(a stale writer gets ``ConcurrencyError``) and backed by a unique constraint.

Inline projections run in the same transaction, so a read after a write sees it.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import IntegrityError, InterfaceError, OperationalError, connection, transaction

from audit import catalogue
from audit.actor import Actor
from audit.errors import ConcurrencyError, EventStoreUnavailable, InvalidEvent
from audit.hashing import EVENT_COLUMNS, GENESIS_HASH, check_data, format_time, hash_parts
from audit.models import Event

__all__ = [
    "ANY_VERSION",
    "PendingEvent",
    "RecordedEvent",
    "append",
    "append_many",
    "aggregate_version",
    "head",
    "iter_events",
    "lock",
]

log = logging.getLogger("sandbox.audit")

ANY_VERSION = -1  # append without an optimistic concurrency check (security events)

TABLE = Event._meta.db_table
COLUMNS = EVENT_COLUMNS
_SELECT = ", ".join(COLUMNS)
# The append lock: a transaction-level advisory lock with the store's own key. (LOCK TABLE ... IN
# EXCLUSIVE MODE needs UPDATE, DELETE or TRUNCATE on the table, which the product's database
# role must not have: audit.roles.) lock_timeout applies to it like to any lock.
APPEND_LOCK_KEY = 0x61756469745F6C67  # "audit_lg" in ASCII
LOCK_SQL = f"SELECT pg_advisory_xact_lock({APPEND_LOCK_KEY})"


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """An event to append. ``expected_version`` is the aggregate's version the caller saw."""

    aggregate_type: str
    aggregate_id: str
    type: str
    data: dict[str, Any] = field(default_factory=dict)
    expected_version: int = ANY_VERSION
    causation_id: str = ""


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as stored; what projectors, followers and exports see."""

    position: int
    event_id: str
    aggregate_type: str
    aggregate_id: str
    version: int
    type: str
    schema_version: int
    data_json: str
    actor_type: str
    actor_id: str
    actor_name: str
    token_id: str
    channel: str
    source_ip: str
    request_id: str
    correlation_id: str
    causation_id: str
    recorded_at: datetime
    prev_hash: str
    hash: str

    @property
    def data(self) -> dict[str, Any]:
        return json.loads(self.data_json)

    def hashed_fields(self) -> dict[str, Any]:
        """Column name to stored value (``data`` is the canonical JSON text)."""
        return {name: self.data_json if name == "data" else getattr(self, name) for name in COLUMNS}

    def as_dict(self) -> dict[str, Any]:
        out = self.hashed_fields()
        out["recorded_at"] = self.recorded_at.astimezone(UTC).isoformat(timespec="microseconds")
        out["data"] = self.data
        return out

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> RecordedEvent:
        values = list(row)
        event_id = values[1]
        values[1] = str(event_id) if isinstance(event_id, uuid.UUID) else str(uuid.UUID(event_id))
        recorded = values[17]
        if isinstance(recorded, str):
            recorded = datetime.fromisoformat(recorded)
        if recorded.tzinfo is None:
            recorded = recorded.replace(tzinfo=UTC)
        values[17] = recorded
        values[13] = values[13] or ""
        return cls(*values)


def lock() -> None:
    """Take the append lock for the rest of the current transaction.

    Commands take it before reading the projections they check (state, quota), so that checks
    and appends of concurrent commands happen one after the other.
    """
    if not connection.in_atomic_block:
        raise RuntimeError("store.lock() outside a transaction would be released at once")
    try:
        _lock()
    except (OperationalError, InterfaceError) as exc:
        # The lock timed out (another session holds it) or the database is gone: the command
        # cannot record its request, so it must not act (fail closed, like an append).
        raise EventStoreUnavailable(f"event store unavailable: {exc}") from exc


def _append_lock_held() -> None:
    """A no-op commit hook whose presence says this transaction holds the append lock."""


def _holds_lock() -> bool:
    # The hook goes where the lock goes: a commit or rollback clears the hooks and releases
    # the lock; rolling back to a savepoint drops the hooks added after it, as PostgreSQL
    # releases the locks taken after it. So a command that took the lock before checking its
    # projections does not pay a second round trip when it appends.
    return any(hook[1] is _append_lock_held for hook in connection.run_on_commit)


def _lock() -> None:
    """Serialize appenders for the rest of this transaction (once per transaction)."""
    if connection.vendor == "postgresql":
        if _holds_lock():
            return
        timeout = int(settings.SANDBOX_EVENT_LOCK_TIMEOUT_MS)
        with connection.cursor() as cur:
            if f"lock_timeout={timeout}" not in connection.settings_dict["OPTIONS"].get(
                "options", ""
            ):
                # The session's lock_timeout (set at connect) is not the configured one.
                cur.execute(f"SET LOCAL lock_timeout = '{timeout}ms'")
            with connection.wrap_database_errors:  # psycopg's errors as Django's
                cur.cursor.execute(LOCK_SQL, prepare=True)
        connection.on_commit(_append_lock_held)
    # SQLite: the IMMEDIATE transaction already holds the database's write lock.


def head() -> tuple[int, str]:
    """(last position, last hash); (0, GENESIS_HASH) for an empty store."""
    with connection.cursor() as cur:
        cur.execute(f"SELECT position, hash FROM {TABLE} ORDER BY position DESC LIMIT 1")
        row = cur.fetchone()
    return (row[0], row[1]) if row else (0, GENESIS_HASH)


def aggregate_version(aggregate_type: str, aggregate_id: str) -> int:
    with connection.cursor() as cur:
        cur.execute(
            f"SELECT COALESCE(MAX(version), 0) FROM {TABLE} "
            "WHERE aggregate_type = %s AND aggregate_id = %s",
            [aggregate_type, aggregate_id],
        )
        return cur.fetchone()[0]


def _head_and_versions(keys: list[tuple[str, str]]) -> tuple[int, str, dict[tuple[str, str], int]]:
    with connection.cursor() as cur:
        if len(keys) == 1:
            # One round trip for the common single-aggregate command.
            cur.execute(
                f"SELECT h.position, h.hash, v.version FROM "
                f"(SELECT COALESCE(MAX(version), 0) AS version FROM {TABLE} "
                f" WHERE aggregate_type = %s AND aggregate_id = %s) v "
                f"LEFT JOIN (SELECT position, hash FROM {TABLE} "
                f" ORDER BY position DESC LIMIT 1) h ON 1 = 1",
                list(keys[0]),
            )
            position, last_hash, version = cur.fetchone()
            versions = {keys[0]: version}
        else:
            cur.execute(f"SELECT position, hash FROM {TABLE} ORDER BY position DESC LIMIT 1")
            row = cur.fetchone()
            position, last_hash = row if row else (None, None)
            versions = dict.fromkeys(keys, 0)
            # One index probe per aggregate (a correlated MAX over the unique key): an OR of
            # hundreds of pairs plans and runs far worse on PostgreSQL.
            for i in range(0, len(keys), 200):
                chunk = keys[i : i + 200]
                values = ", ".join(["(%s, %s)"] * len(chunk))
                params = [p for key in chunk for p in key]
                cur.execute(
                    f"WITH k(t, i) AS (VALUES {values}) "
                    f"SELECT k.t, k.i, (SELECT MAX(e.version) FROM {TABLE} e "
                    f" WHERE e.aggregate_type = k.t AND e.aggregate_id = k.i) FROM k",
                    params,
                )
                for atype, aid, version in cur.fetchall():
                    versions[(atype, aid)] = version or 0
    return (position or 0), (last_hash or GENESIS_HASH), versions


def append(
    aggregate_type: str,
    aggregate_id: str,
    type: str,
    data: dict[str, Any] | None = None,
    *,
    actor: Actor,
    expected_version: int = ANY_VERSION,
    causation_id: str = "",
    correlation_id: str = "",
    not_before: int = 0,
) -> RecordedEvent:
    """Append one event; see ``append_many``."""
    return append_many(
        [
            PendingEvent(
                aggregate_type, aggregate_id, type, data or {}, expected_version, causation_id
            )
        ],
        actor=actor,
        correlation_id=correlation_id,
        not_before=not_before,
    )[0]


def append_many(
    pending: Sequence[PendingEvent],
    *,
    actor: Actor,
    correlation_id: str = "",
    not_before: int = 0,
) -> list[RecordedEvent]:
    """Append events atomically, in order, and apply inline projections to them.

    ``not_before``: the first event takes a position of at least this, leaving a gap after the
    head. Only for recording on a log whose tail was cut: positions that a digest signed must
    not be given to new events (``audit.commands.verify_chain``).

    Joins the caller's transaction when there is one, so that the caller's read-model writes and
    the events commit together; otherwise opens its own. Raises ``ConcurrencyError`` for a stale
    ``expected_version``, ``EventStoreUnavailable`` when the store cannot take the events (the
    caller must then not act), ``InvalidEvent`` for an unknown type or non-JSON data.
    """
    if not pending:
        return []
    prepared = []
    for p in pending:
        spec = catalogue.get(p.type)
        if spec is None:
            raise InvalidEvent(f"unknown event type {p.type!r}: add it to audit.catalogue")
        if spec.aggregate_type != p.aggregate_type:
            raise InvalidEvent(f"{p.type} belongs to {spec.aggregate_type}, not {p.aggregate_type}")
        if not p.aggregate_id or len(p.aggregate_id) > 64:
            raise InvalidEvent("aggregate id must be 1 to 64 characters")
        try:
            data_json = check_data(p.data)
        except ValueError as exc:
            raise InvalidEvent(str(exc)) from exc
        prepared.append((p, spec.schema_version, data_json))

    correlation = correlation_id or actor.request_id or uuid.uuid4().hex
    actor_fields = actor.as_fields()
    try:
        with transaction.atomic(savepoint=False):
            _lock()
            keys = list(dict.fromkeys((p.aggregate_type, p.aggregate_id) for p in pending))
            position, prev_hash, versions = _head_and_versions(keys)
            position = max(position, not_before - 1)
            now = datetime.now(UTC)
            # Per call, not per event: the vendor and adapted values (Django's connection proxy
            # is a thread-local lookup), and the hashed parts every event of the call shares.
            db_now = connection.ops.adapt_datetimefield_value(now)
            as_uuid = connection.vendor == "postgresql"
            now_text = format_time(now)
            a = actor_fields
            actor_parts = [
                a["actor_type"], a["actor_id"], a["actor_name"], a["token_id"], a["channel"],
                a["source_ip"], a["request_id"], correlation,
            ]  # fmt: skip
            recorded: list[RecordedEvent] = []
            rows: list[Any] = []
            for p, schema_version, data_json in prepared:
                key = (p.aggregate_type, p.aggregate_id)
                current = versions[key]
                if p.expected_version != ANY_VERSION and p.expected_version != current:
                    from sandbox_site.metrics import APPEND_FAILURES

                    APPEND_FAILURES.labels("conflict").inc()
                    raise ConcurrencyError(
                        p.aggregate_type, p.aggregate_id, p.expected_version, current
                    )
                version = versions[key] = current + 1
                position += 1
                event_id = uuid.uuid4()
                event_id_text = str(event_id)
                digest = hash_parts(
                    [
                        event_id_text, p.aggregate_type, p.aggregate_id, str(version), p.type,
                        str(schema_version), *actor_parts, p.causation_id, now_text,
                    ],
                    data_json,
                    prev_hash,
                )  # fmt: skip
                recorded.append(
                    RecordedEvent(
                        position, event_id_text, p.aggregate_type, p.aggregate_id, version,
                        p.type, schema_version, data_json, a["actor_type"], a["actor_id"],
                        a["actor_name"], a["token_id"], a["channel"], a["source_ip"],
                        a["request_id"], correlation, p.causation_id, now, prev_hash, digest,
                    )
                )  # fmt: skip
                rows.append(
                    [
                        position, event_id if as_uuid else event_id.hex, p.aggregate_type,
                        p.aggregate_id, version, p.type, schema_version, data_json,
                        a["actor_type"], a["actor_id"], a["actor_name"], a["token_id"],
                        a["channel"], a["source_ip"], a["request_id"], correlation,
                        p.causation_id, db_now, prev_hash, digest,
                    ]
                )  # fmt: skip
                prev_hash = digest
            _insert(rows)
            from audit import projections

            projections.apply_inline(recorded)
    except (ConcurrencyError, InvalidEvent):
        raise
    except IntegrityError as exc:
        # The unique (aggregate, version) key is the backstop behind the check above.
        raise ConcurrencyError(pending[0].aggregate_type, pending[0].aggregate_id, -1, -1) from exc
    except (OperationalError, InterfaceError) as exc:
        from sandbox_site.metrics import APPEND_FAILURES

        APPEND_FAILURES.labels("unavailable").inc()
        raise EventStoreUnavailable(f"event store unavailable: {exc}") from exc

    from sandbox_site.metrics import EVENTS_APPENDED

    for kind, n in Counter(e.type for e in recorded).items():
        EVENTS_APPENDED.labels(kind).inc(n)
    return recorded


COPY_THRESHOLD = 8


def _insert(rows: list[list[Any]]) -> None:
    if connection.vendor == "postgresql" and len(rows) >= COPY_THRESHOLD:
        # COPY moves a batch in one stream with binary-free text rows and no per-parameter
        # client-side binding; INSERT triggers (the NOTIFY) still fire for COPY.
        with (
            connection.cursor() as cur,
            cur.cursor.copy(f"COPY {TABLE} ({_SELECT}) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(row)
        return
    placeholders = "(" + ", ".join(["%s"] * len(COLUMNS)) + ")"
    with connection.cursor() as cur:
        for i in range(0, len(rows), 500):
            chunk = rows[i : i + 500]
            cur.execute(
                f"INSERT INTO {TABLE} ({_SELECT}) VALUES " + ", ".join([placeholders] * len(chunk)),
                [v for row in chunk for v in row],
            )


def iter_events(
    after: int = 0,
    *,
    until: int | None = None,
    types: frozenset[str] | None = None,
    batch: int = 5000,
) -> Iterator[list[RecordedEvent]]:
    """Batches of events in position order, from ``after`` (exclusive) to ``until`` (inclusive).

    Keyset pagination by position: constant memory, no long-lived server-side cursor.
    """
    position = after
    type_filter = ""
    type_params: list[Any] = []
    if types is not None:
        if not types:
            return
        type_filter = " AND type IN (" + ", ".join(["%s"] * len(types)) + ")"
        type_params = sorted(types)
    while True:
        upper = "" if until is None else " AND position <= %s"
        params: list[Any] = [position] + ([] if until is None else [until]) + type_params + [batch]
        with connection.cursor() as cur:
            cur.execute(
                f"SELECT {_SELECT} FROM {TABLE} WHERE position > %s{upper}{type_filter} "
                "ORDER BY position LIMIT %s",
                params,
            )
            rows = cur.fetchall()
        if not rows:
            return
        events = [RecordedEvent.from_row(r) for r in rows]
        yield events
        position = events[-1].position
        if len(rows) < batch:
            return
