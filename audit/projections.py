"""Projections: read models folded from the log, each applied exactly once.

A projector declares the event types it reads. Its checkpoint row (name, position) is written in
the same transaction as its read-model rows: a crash leaves both or neither. Inline projectors
run inside the append transaction (a read after a write sees it); the others follow the log from
their checkpoint (``run_pending``), in the worker. ``rebuild`` resets a projection and replays
the whole log; the result must equal the incrementally built one.

Projectors get events in batches so that a rebuild can fold many events in memory and write
each row once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any, ClassVar, TypeVar

from django.db import connection, models, transaction
from django.utils.module_loading import autodiscover_modules

from audit.events import RecordedEvent, append_lock, head, iter_events
from audit.models import ProjectionCheckpoint

__all__ = [
    "Projector",
    "apply_inline",
    "get",
    "lag_by_projection",
    "load_rows",
    "rebuild",
    "register",
    "registry",
    "run_pending",
    "update_rows",
]

log = logging.getLogger("sandbox.audit.projections")

M = TypeVar("M", bound=models.Model)


class Projector:
    """Subclass, set ``name`` and ``event_types``, implement ``handle`` and ``reset``."""

    name: ClassVar[str]
    event_types: ClassVar[frozenset[str]]
    inline: ClassVar[bool] = True

    def handle(self, events: Sequence[RecordedEvent]) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Delete every row of this projection's read model."""
        raise NotImplementedError


_registry: dict[str, Projector] = {}
_inline: list[Projector] = []
_discovered = False


def register(cls: type[Projector]) -> type[Projector]:
    """Class decorator: register a projector (one instance per process)."""
    instance = cls()
    if cls.name in _registry and type(_registry[cls.name]) is not cls:
        raise ValueError(f"two projectors named {cls.name}")
    _registry[cls.name] = instance
    _inline[:] = [p for p in _registry.values() if p.inline]
    return cls


def _discover() -> None:
    global _discovered
    if not _discovered:
        autodiscover_modules("projectors")
        _discovered = True


def registry() -> dict[str, Projector]:
    _discover()
    return dict(_registry)


def get(name: str) -> Projector:
    _discover()
    try:
        return _registry[name]
    except KeyError:
        known = ", ".join(sorted(_registry)) or "none"
        raise KeyError(f"no projection named {name!r} (known: {known})") from None


def _save_checkpoint(name: str, position: int) -> None:
    table = ProjectionCheckpoint._meta.db_table
    with connection.cursor() as cur:
        cur.execute(
            f"UPDATE {table} SET position = %s, updated_at = CURRENT_TIMESTAMP WHERE name = %s",
            [position, name],
        )
        if cur.rowcount == 0:
            cur.execute(
                f"INSERT INTO {table} (name, position, updated_at) "
                "VALUES (%s, %s, CURRENT_TIMESTAMP)",
                [name, position],
            )


def _save_checkpoints(positions: dict[str, int]) -> None:
    """``_save_checkpoint`` for several projections in one UPDATE (an append's inline
    projections: one statement, not one per projection)."""
    if len(positions) == 1:
        [(name, position)] = positions.items()
        _save_checkpoint(name, position)
        return
    table = ProjectionCheckpoint._meta.db_table
    names = list(positions)
    cases = " ".join("WHEN %s THEN CAST(%s AS BIGINT)" for _ in names)
    marks = ", ".join("%s" for _ in names)
    with connection.cursor() as cur:
        cur.execute(
            f"UPDATE {table} SET position = CASE name {cases} END, "
            f"updated_at = CURRENT_TIMESTAMP WHERE name IN ({marks})",
            [*(x for name in names for x in (name, positions[name])), *names],
        )
        if cur.rowcount == len(names):
            return
    for name in names:  # a projection's first checkpoint: its row is made on first use
        _save_checkpoint(name, positions[name])


def apply_inline(events: Sequence[RecordedEvent]) -> None:
    """Called by the store inside the append transaction."""
    _discover()
    positions: dict[str, int] = {}
    for projector in _inline:
        relevant = [e for e in events if e.type in projector.event_types]
        if relevant:
            projector.handle(relevant)
            positions[projector.name] = relevant[-1].position
    if positions:
        _save_checkpoints(positions)


# Up to this many rows are read and written with SQL built once per model and shape (a plain
# UPDATE per row); more (a rebuild's batch) through the ORM's filter() and bulk_update. For the
# one or two rows of a command, bulk_update's CASE WHEN per field and the queryset compilation
# cost several times the statements themselves: most of an inline projection's time.
ROW_UPDATE_LIMIT = 8


def _column(field: models.Field[Any, Any] | Any) -> str:
    column = field.column
    if not isinstance(column, str):
        raise TypeError(f"{field} has no column")
    return connection.ops.quote_name(column)


@lru_cache(maxsize=64)
def _update_sql(
    model: type[models.Model], field_names: tuple[str, ...], vendor: str
) -> tuple[str, list[Any]]:
    meta = model._meta
    fields = [meta.get_field(name) for name in field_names]
    assignments = ", ".join(f"{_column(f)} = %s" for f in fields)
    table = connection.ops.quote_name(meta.db_table)
    return f"UPDATE {table} SET {assignments} WHERE {_column(meta.pk)} = %s", fields


@lru_cache(maxsize=64)
def _select_sql(
    model: type[models.Model], count: int, vendor: str
) -> tuple[str, list[str], list[tuple[list[Any], Any]]]:
    meta = model._meta
    fields = meta.concrete_fields
    table = connection.ops.quote_name(meta.db_table)
    columns = ", ".join(f"{table}.{_column(f)}" for f in fields)
    keys = ", ".join(["%s"] * count)
    sql = f"SELECT {columns} FROM {table} WHERE {_column(meta.pk)} IN ({keys})"
    # The converters the ORM applies to each column (the backend's, then the field's).
    converters = []
    for f in fields:
        col = f.get_col(meta.db_table)
        converters.append(
            ([*connection.ops.get_db_converters(col), *col.get_db_converters(connection)], col)
        )
    return sql, [f.attname for f in fields], converters


def load_rows(model: type[M], keys: Iterable[Any]) -> dict[Any, M]:
    """The rows of ``model`` with these primary keys, by key, as model instances (what
    ``filter(pk__in=keys)`` gives, with its SQL built once per model and key count)."""
    keys = list(keys)
    if not keys:
        return {}
    if len(keys) > ROW_UPDATE_LIMIT:
        return {row.pk: row for row in model._default_manager.filter(pk__in=keys)}
    sql, attnames, converters = _select_sql(model, len(keys), connection.vendor)
    pk = model._meta.pk
    assert pk is not None  # noqa: S101 (every model has one)
    params = [pk.get_db_prep_value(pk.to_python(k), connection) for k in keys]
    with connection.cursor() as cur:
        cur.execute(sql, params)
        fetched = cur.fetchall()
    out: dict[Any, M] = {}
    for raw in fetched:
        values = []
        for value, (convs, col) in zip(raw, converters, strict=True):
            for convert in convs:
                value = convert(value, col, connection)
            values.append(value)
        row = model.from_db(connection.alias, attnames, values)
        out[row.pk] = row
    return out


def update_rows(model: type[M], rows: Iterable[M], field_names: Sequence[str]) -> None:
    """Write ``field_names`` of existing ``rows`` of ``model`` (what bulk_update does, without
    its per-call compilation for the few rows of an inline projection). Values are prepared by
    each field as the ORM prepares them for a save; no signals, no ``auto_now``, like
    bulk_update."""
    rows = list(rows)
    if not rows:
        return
    if len(rows) > ROW_UPDATE_LIMIT:
        model._default_manager.bulk_update(rows, list(field_names))
        return
    sql, fields = _update_sql(model, tuple(field_names), connection.vendor)
    pk = model._meta.pk
    assert pk is not None  # noqa: S101 (every model has one)
    with connection.cursor() as cur:
        for row in rows:
            params = [f.get_db_prep_save(getattr(row, f.attname), connection) for f in fields]
            params.append(pk.get_db_prep_value(row.pk, connection))
            cur.execute(sql, params)


def _checkpoint_for_update(name: str) -> int:
    """The checkpoint, row-locked so that two followers never apply the same batch."""
    ProjectionCheckpoint.objects.get_or_create(name=name)
    return ProjectionCheckpoint.objects.select_for_update().get(name=name).position


def run_pending(name: str | None = None, *, batch: int = 2000, max_batches: int = 50) -> int:
    """Advance followed (not inline) projections; returns how many events were applied."""
    applied = 0
    for projector in registry().values():
        if projector.inline or (name and projector.name != name):
            continue
        for _ in range(max_batches):
            with transaction.atomic():
                position = _checkpoint_for_update(projector.name)
                # Appends commit in position order, so everything up to the head is visible:
                # after the last relevant event the checkpoint can move to the head itself.
                until = head()[0]
                if until <= position:
                    break
                batch_events = next(
                    iter_events(position, until=until, types=projector.event_types, batch=batch),
                    [],
                )
                if batch_events:
                    projector.handle(batch_events)
                    applied += len(batch_events)
                done = len(batch_events) < batch
                _save_checkpoint(projector.name, until if done else batch_events[-1].position)
            if done:
                break
    return applied


def rebuild(name: str, *, batch: int = 5000) -> int:
    """Reset one projection and replay the whole log into it, in one transaction.

    For an inline projection the event table is locked meanwhile, so no append can slip in
    between the replay and the switch back to inline application. Returns events applied.
    """
    projector = get(name)
    count = 0
    with transaction.atomic():
        if projector.inline:
            append_lock()
        else:
            _checkpoint_for_update(projector.name)
        projector.reset()
        until = head()[0]
        for events in iter_events(0, until=until, types=projector.event_types, batch=batch):
            projector.handle(events)
            count += len(events)
        _save_checkpoint(projector.name, until)
    log.info("projection rebuilt", extra={"projection": name, "events": count})
    return count


def lag_by_projection(head_position: int | None = None) -> dict[str, int]:
    """For followed projections: events of their types past their checkpoint."""
    position = head()[0] if head_position is None else head_position
    checkpoints = dict(ProjectionCheckpoint.objects.values_list("name", "position"))
    return {
        name: max(0, position - checkpoints.get(name, 0))
        for name, projector in registry().items()
        if not projector.inline
    }
