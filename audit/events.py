"""The event table underneath the store: the append lock, the head, reading events in order.

What the store (appends), the projections (replays), the digests (signing under the lock) and the
integrity checks all need, below all of them: it imports no other module of the app but the
table's model and the hashed column list.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection

from audit.errors import EventStoreUnavailable
from audit.hashing import EVENT_COLUMNS, GENESIS_HASH
from audit.models import Event

__all__ = [
    "APPEND_LOCK_KEY",
    "COLUMNS",
    "LOCK_SQL",
    "TABLE",
    "RecordedEvent",
    "append_lock",
    "head",
    "iter_events",
    "lock",
]

TABLE = Event._meta.db_table
COLUMNS = EVENT_COLUMNS
SELECT_COLUMNS = ", ".join(COLUMNS)
# The append lock: a transaction-level advisory lock with the store's own key. (LOCK TABLE ... IN
# EXCLUSIVE MODE needs UPDATE, DELETE or TRUNCATE on the table, which the product's database
# role must not have: audit.roles.) lock_timeout applies to it like to any lock.
APPEND_LOCK_KEY = 0x61756469745F6C67  # "audit_lg" in ASCII
LOCK_SQL = f"SELECT pg_advisory_xact_lock({APPEND_LOCK_KEY})"


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
        append_lock()
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


def append_lock() -> None:
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
                f"SELECT {SELECT_COLUMNS} FROM {TABLE} WHERE position > %s{upper}{type_filter} "
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
