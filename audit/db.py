"""Append-only protection in the database, for PostgreSQL and SQLite.

Triggers reject UPDATE and DELETE of every row, and TRUNCATE (PostgreSQL; SQLite has none, and a
DELETE without WHERE still fires the row trigger). A superuser can still disable triggers: the hash
chain and the signed digests are what prove tampering; the triggers stop accidents and the product's
own code from ever rewriting history. On PostgreSQL a statement trigger also NOTIFYs
``audit_events`` after each insert, waking the web processes that follow the log.
"""

from __future__ import annotations

from typing import Any

PROTECTED_TABLES = ("audit_event", "audit_digest")
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


def create_statements(vendor: str) -> list[str]:
    if vendor == "postgresql":
        return [s for t in PROTECTED_TABLES for s in _pg_create(t)] + PG_NOTIFY
    if vendor == "sqlite":
        return [s for t in PROTECTED_TABLES for s in _sqlite_create(t)]
    raise NotImplementedError(f"append-only triggers are not written for {vendor}")


def drop_statements(vendor: str) -> list[str]:
    if vendor == "postgresql":
        return [s for t in PROTECTED_TABLES for s in _pg_drop(t)] + PG_NOTIFY_DROP
    if vendor == "sqlite":
        return [s for t in PROTECTED_TABLES for s in _sqlite_drop(t)]
    raise NotImplementedError(vendor)


def install(apps: Any, schema_editor: Any) -> None:
    for sql in create_statements(schema_editor.connection.vendor):
        schema_editor.execute(sql, None)  # None: no %-interpolation of the SQL


def uninstall(apps: Any, schema_editor: Any) -> None:
    for sql in drop_statements(schema_editor.connection.vendor):
        schema_editor.execute(sql, None)  # None: no %-interpolation of the SQL


def reinstall_after_rebuild(apps: Any, schema_editor: Any) -> None:
    """SQLite applies most field changes by rebuilding the table, which drops its triggers: any
    migration that alters a protected table must end with this operation."""
    if schema_editor.connection.vendor == "sqlite":
        install(apps, schema_editor)
