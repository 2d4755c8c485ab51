"""Append-only protection in the database, for PostgreSQL and SQLite.

Protected: the events, the signed digests and the digest key history. Triggers reject UPDATE and
DELETE of every row, and TRUNCATE (PostgreSQL; SQLite has none, and a
DELETE without WHERE still fires the row trigger). A superuser can still disable triggers: the hash
chain and the signed digests are what prove tampering; the triggers stop accidents and the product's
own code from ever rewriting history. On PostgreSQL a statement trigger also NOTIFYs
``audit_events`` after each insert, waking the web processes that follow the log.
"""

from __future__ import annotations

from typing import Any

# The tables of migration 0002, then the key history (migration 0005).
EVENT_TABLES = ("audit_event", "audit_digest")
KEY_TABLES = ("audit_digestkey",)
PROTECTED_TABLES = EVENT_TABLES + KEY_TABLES
NOTIFY_CHANNEL = "audit_events"


def _pg_create(table: str) -> list[str]:
    return [
        f"""
        CREATE OR REPLACE FUNCTION {table}_append_only() RETURNS trigger AS $$
        BEGIN
            RAISE EXCEPTION '{table} is append-only: % refused', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END;
        $$ LANGUAGE plpgsql;
        """,
        f"""CREATE TRIGGER {table}_no_update_delete BEFORE UPDATE OR DELETE ON {table}
            FOR EACH ROW EXECUTE FUNCTION {table}_append_only();""",
        f"""CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table}
            FOR EACH STATEMENT EXECUTE FUNCTION {table}_append_only();""",
    ]


def _pg_drop(table: str) -> list[str]:
    return [
        f"DROP TRIGGER IF EXISTS {table}_no_update_delete ON {table};",
        f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table};",
        f"DROP FUNCTION IF EXISTS {table}_append_only();",
    ]


PG_NOTIFY = [
    f"""
    CREATE OR REPLACE FUNCTION audit_event_notify() RETURNS trigger AS $$
    BEGIN
        PERFORM pg_notify('{NOTIFY_CHANNEL}', '');
        RETURN NULL;
    END;
    $$ LANGUAGE plpgsql;
    """,
    """CREATE TRIGGER audit_event_notify AFTER INSERT ON audit_event
        FOR EACH STATEMENT EXECUTE FUNCTION audit_event_notify();""",
]
PG_NOTIFY_DROP = [
    "DROP TRIGGER IF EXISTS audit_event_notify ON audit_event;",
    "DROP FUNCTION IF EXISTS audit_event_notify();",
]


def _sqlite_create(table: str) -> list[str]:
    return [
        f"""CREATE TRIGGER IF NOT EXISTS {table}_no_update BEFORE UPDATE ON {table}
            BEGIN SELECT RAISE(ABORT, '{table} is append-only: UPDATE refused'); END;""",
        f"""CREATE TRIGGER IF NOT EXISTS {table}_no_delete BEFORE DELETE ON {table}
            BEGIN SELECT RAISE(ABORT, '{table} is append-only: DELETE refused'); END;""",
    ]


def _sqlite_drop(table: str) -> list[str]:
    return [
        f"DROP TRIGGER IF EXISTS {table}_no_update;",
        f"DROP TRIGGER IF EXISTS {table}_no_delete;",
    ]


def create_statements(
    vendor: str, tables: tuple[str, ...] = PROTECTED_TABLES, *, notify: bool = True
) -> list[str]:
    if vendor == "postgresql":
        return [s for t in tables for s in _pg_create(t)] + (PG_NOTIFY if notify else [])
    if vendor == "sqlite":
        return [s for t in tables for s in _sqlite_create(t)]
    raise NotImplementedError(f"append-only triggers are not written for {vendor}")


def drop_statements(
    vendor: str, tables: tuple[str, ...] = PROTECTED_TABLES, *, notify: bool = True
) -> list[str]:
    if vendor == "postgresql":
        return [s for t in tables for s in _pg_drop(t)] + (PG_NOTIFY_DROP if notify else [])
    if vendor == "sqlite":
        return [s for t in tables for s in _sqlite_drop(t)]
    raise NotImplementedError(vendor)


def _execute(schema_editor: Any, statements: list[str]) -> None:
    for sql in statements:
        schema_editor.execute(sql, None)  # None: no %-interpolation of the SQL


def install(apps: Any, schema_editor: Any) -> None:
    """Migration 0002: the event and digest tables (the key history did not exist yet)."""
    _execute(schema_editor, create_statements(schema_editor.connection.vendor, EVENT_TABLES))


def uninstall(apps: Any, schema_editor: Any) -> None:
    _execute(schema_editor, drop_statements(schema_editor.connection.vendor, EVENT_TABLES))


def install_key_history(apps: Any, schema_editor: Any) -> None:
    """Migration 0005: the digest key history becomes append-only like the events."""
    vendor = schema_editor.connection.vendor
    _execute(schema_editor, create_statements(vendor, KEY_TABLES, notify=False))


def reinstall_after_rebuild(apps: Any, schema_editor: Any) -> None:
    """SQLite applies most field changes by rebuilding the table, which drops its triggers: any
    migration that alters a protected table must end with this operation."""
    if schema_editor.connection.vendor == "sqlite":
        existing = set(schema_editor.connection.introspection.table_names())
        tables = tuple(t for t in PROTECTED_TABLES if t in existing)
        _execute(schema_editor, create_statements("sqlite", tables))
