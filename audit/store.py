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

import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.db import IntegrityError, InterfaceError, OperationalError, connection, transaction

from audit import catalogue, metrics, projections
from audit.actor import Actor
from audit.errors import ConcurrencyError, EventStoreUnavailable, InvalidEvent
from audit.events import (
    APPEND_LOCK_KEY,
    COLUMNS,
    LOCK_SQL,
    SELECT_COLUMNS,
    TABLE,
    RecordedEvent,
    append_lock,
    head,
    iter_events,
    lock,
)
from audit.hashing import GENESIS_HASH, check_data, format_time, hash_parts

# The event table's reading side and the append lock live in ``audit.events`` (below the
# projections, which replay with them); named here too, as the store's public face.
__all__ = [
    "ANY_VERSION",
    "APPEND_LOCK_KEY",
    "COLUMNS",
    "LOCK_SQL",
    "TABLE",
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


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """An event to append. ``expected_version`` is the aggregate's version the caller saw."""

    aggregate_type: str
    aggregate_id: str
    type: str
    data: dict[str, Any] = field(default_factory=dict)
    expected_version: int = ANY_VERSION
    causation_id: str = ""


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
            append_lock()
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
                    metrics.APPEND_FAILURES.labels("conflict").inc()
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
            projections.apply_inline(recorded)
    except (ConcurrencyError, InvalidEvent):
        raise
    except IntegrityError as exc:
        # The unique (aggregate, version) key is the backstop behind the check above.
        raise ConcurrencyError(pending[0].aggregate_type, pending[0].aggregate_id, -1, -1) from exc
    except (OperationalError, InterfaceError) as exc:
        metrics.APPEND_FAILURES.labels("unavailable").inc()
        raise EventStoreUnavailable(f"event store unavailable: {exc}") from exc

    for kind, n in Counter(e.type for e in recorded).items():
        metrics.EVENTS_APPENDED.labels(kind).inc(n)
    return recorded


COPY_THRESHOLD = 8


def _insert(rows: list[list[Any]]) -> None:
    if connection.vendor == "postgresql" and len(rows) >= COPY_THRESHOLD:
        # COPY moves a batch in one stream with binary-free text rows and no per-parameter
        # client-side binding; INSERT triggers (the NOTIFY) still fire for COPY.
        with (
            connection.cursor() as cur,
            cur.cursor.copy(f"COPY {TABLE} ({SELECT_COLUMNS}) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(row)
        return
    placeholders = "(" + ", ".join(["%s"] * len(COLUMNS)) + ")"
    with connection.cursor() as cur:
        for i in range(0, len(rows), 500):
            chunk = rows[i : i + 500]
            cur.execute(
                f"INSERT INTO {TABLE} ({SELECT_COLUMNS}) VALUES "
                + ", ".join([placeholders] * len(chunk)),
                [v for row in chunk for v in row],
            )
