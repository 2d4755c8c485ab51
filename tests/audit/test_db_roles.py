"""Least privilege in the database: the product's role cannot rewrite the log, and no migration
lifts the append-only protection.

- A scratch database set up the documented way (``setup_database_roles``, then ``migrate`` as the
  owner through ``DATABASE_OWNER_URL``) gives the runtime role SELECT and INSERT on the audit
  tables and nothing that could change them: no UPDATE, DELETE, TRUNCATE, DISABLE TRIGGER, DDL,
  nor a way to become the owner; the product still appends and verifies as that role.
- When the suite itself runs as the runtime role (CI does), the same holds for the test database.
- Every migration is scanned for anything that drops or disables the triggers or the protected
  tables, and reversing the audit migrations is refused before anything changes.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import psycopg
import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError, connection, migrations, transaction
from django.db.migrations.loader import MigrationLoader

from audit import db as audit_db
from audit.store import LOCK_SQL
from tests.audit.helpers import append_user_events
from tests.conftest import acting_as_owner

ROOT = Path(__file__).resolve().parents[2]

# Anything in a migration's SQL that takes the protection away.
_LIFTS_PROTECTION = re.compile(
    r"\b(DROP|DISABLE)\s+TRIGGER\b|\bALTER\s+TABLE\b[^;]*\bDISABLE\b|session_replication_role"
    r"|\b(DROP|TRUNCATE)\s+(TABLE\s+)?(IF\s+EXISTS\s+)?\"?("
    + "|".join(audit_db.PROTECTED_TABLES)
    + r")\b",
    re.IGNORECASE,
)
# What Python code in a migration must not mention unless it is one of the functions below.
_TOUCHES_PROTECTION = re.compile(
    r"TRIGGER|drop_statements|uninstall|PROTECTED_TABLES|" + "|".join(audit_db.PROTECTED_TABLES),
    re.IGNORECASE,
)
# The audit app's own functions that install the triggers (reviewed; see audit.db).
_INSTALLERS = {audit_db.install, audit_db.install_key_history, audit_db.reinstall_after_rebuild}
_PROTECTED_MODELS = {"event", "digest", "digestkey"}


# --- a scratch database set up the documented way ------------------------------------------------


def _admin_url() -> str | None:
    """An administrator on the test server: SANDBOX_TEST_DB_ADMIN_URL, or the test login when it
    is a superuser (a developer's machine)."""
    if url := os.environ.get("SANDBOX_TEST_DB_ADMIN_URL"):
        return url
    params = connection.get_connection_params()
    url = "postgres://{user}@{host}:{port}/postgres".format(
        user=params.get("user") or "postgres",
        host=params.get("host") or "127.0.0.1",
        port=params.get("port") or 5432,
    )
    try:
        with psycopg.connect(url, password=params.get("password")) as admin:
            if admin.execute(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
            ).fetchone()[0]:
                return url
    except psycopg.Error:
        return None
    return None


def _with(url: str, *, user: str | None = None, dbname: str | None = None) -> str:
    parts = urlparse(url)
    netloc = parts.netloc
    if user is not None:
        netloc = f"{user}:pw-{user}@{parts.hostname}:{parts.port or 5432}"
    return urlunparse(parts._replace(netloc=netloc, path=f"/{dbname}" if dbname else parts.path))


def _manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "SANDBOX_LOG_LEVEL": "WARNING", **env}
    for name in ("DATABASE_OWNER_URL", "SANDBOX_DB_RUNTIME_ROLE"):
        if name not in env:
            full.pop(name, None)
    return subprocess.run(  # noqa: S603
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


class Scratch:
    def __init__(self, admin_url: str, tag: str) -> None:
        self.admin_url = admin_url
        self.db = f"sandbox_roles_{tag}"
        self.owner = f"sbx_{tag}_owner"
        self.runtime = f"sbx_{tag}_app"

    env: dict[str, str]
    verified: subprocess.CompletedProcess[str]

    def url(self, user: str) -> str:
        return _with(self.admin_url, user=user, dbname=self.db)

    def connect(self, user: str) -> psycopg.Connection:
        return psycopg.connect(self.url(user), autocommit=True)


@pytest.fixture(scope="module")
def scratch(django_db_blocker: Any, tmp_path_factory: Any) -> Iterator[Scratch]:
    with django_db_blocker.unblock():
        if connection.vendor != "postgresql":
            pytest.skip("database roles are a PostgreSQL matter; SQLite has no roles")
        admin_url = _admin_url()
    if admin_url is None:
        pytest.skip(
            "needs a PostgreSQL administrator: a superuser test login or SANDBOX_TEST_DB_ADMIN_URL"
        )
    s = Scratch(admin_url, f"{os.getpid()}")
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{s.db}"')
    env = {
        "SANDBOX_DATA_DIR": str(tmp_path_factory.mktemp("roles-data")),
        "OWNER_PW": f"pw-{s.owner}",
        "RUNTIME_PW": f"pw-{s.runtime}",
        "DATABASE_URL": _with(admin_url, dbname=s.db),
    }
    try:
        done = _manage(
            "setup_database_roles",
            "--owner", s.owner,
            "--runtime", s.runtime,
            "--admin-url", _with(admin_url, dbname=s.db),
            "--owner-password-env", "OWNER_PW",
            "--runtime-password-env", "RUNTIME_PW",
            env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        # The documented way to migrate: the product's URL, and the owner's for the schema.
        env |= {"DATABASE_URL": s.url(s.runtime), "DATABASE_OWNER_URL": s.url(s.owner)}
        migrated = _manage("migrate", "--no-input", env=env)
        assert migrated.returncode == 0, migrated.stderr
        s.env = env
        # The product, as the runtime role, appends (its verification is itself an event).
        product = {k: v for k, v in env.items() if k != "DATABASE_OWNER_URL"}
        s.verified = _manage("verify_audit_chain", env=product)
        yield s
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{s.db}" WITH (FORCE)')
            for role in (s.runtime, s.owner):
                admin.execute(f'DROP ROLE IF EXISTS "{role}"')


_EVENT_ROW = (
    "INSERT INTO audit_event (position, event_id, aggregate_type, aggregate_id, version, type, "
    "schema_version, data, actor_type, actor_id, actor_name, token_id, channel, source_ip, "
    "request_id, correlation_id, causation_id, recorded_at, prev_hash, hash) VALUES "
    "(%s, gen_random_uuid(), 'user', 'x', %s, 'user.created', 1, '{}', 'system', '', '', '', "
    "'shell', '', '', '', '', now(), %s, %s)"
)


def _first_column(conn: Any, table: str) -> str:
    if isinstance(conn, psycopg.Connection):
        cur: Any = conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
            "ORDER BY ordinal_position LIMIT 1",
            [table],
        )
        return cur.fetchone()[0]
    return [c.name for c in conn.introspection.get_table_description(conn.cursor(), table)][0]


def _refused(conn: psycopg.Connection, statement: str) -> str:
    """The error PostgreSQL gives ``statement``; fails the test when it is not refused."""
    try:
        conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege as exc:
        return str(exc)
    pytest.fail(f"the runtime role could run: {statement}")


def test_migrate_ran_as_the_owner(scratch: Scratch) -> None:
    with scratch.connect(scratch.runtime) as conn:
        owners = conn.execute(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    assert owners == [(scratch.owner,)]


def test_the_runtime_role_can_read_and_add_events(scratch: Scratch) -> None:
    with scratch.connect(scratch.runtime) as conn, conn.transaction():
        conn.execute(LOCK_SQL)  # the append lock needs no privilege on the table
        position, before = conn.execute(
            "SELECT max(position) + 1, count(*) FROM audit_event"
        ).fetchone()
        conn.execute(_EVENT_ROW, [position, 1, "0" * 64, "a" * 64])
        assert conn.execute("SELECT count(*) FROM audit_event").fetchone()[0] == before + 1
        raise psycopg.Rollback()


@pytest.mark.parametrize("table", audit_db.PROTECTED_TABLES)
def test_the_runtime_role_cannot_change_or_unprotect_the_audit_tables(
    scratch: Scratch, table: str
) -> None:
    with scratch.connect(scratch.runtime) as conn:
        column = _first_column(conn, table)
        assert "permission denied" in _refused(conn, f"UPDATE {table} SET {column} = {column}")
        assert "permission denied" in _refused(conn, f"DELETE FROM {table}")
        assert "permission denied" in _refused(conn, f"TRUNCATE {table}")
        for statement in (
            f"ALTER TABLE {table} DISABLE TRIGGER USER",
            f"ALTER TABLE {table} DISABLE TRIGGER ALL",
            f"DROP TRIGGER {table}_no_update_delete ON {table}",
            f"DROP TABLE {table}",
        ):
            assert "must be owner" in _refused(conn, statement)


def test_the_runtime_role_cannot_update_or_delete_events(scratch: Scratch) -> None:
    with scratch.connect(scratch.runtime) as conn:
        before = conn.execute("SELECT * FROM audit_event ORDER BY position").fetchall()
        assert before, "the product recorded its verification"
        _refused(conn, "UPDATE audit_event SET actor_name = 'mallory' WHERE position = 1")
        _refused(conn, "DELETE FROM audit_event WHERE position = 1")
        assert conn.execute("SELECT * FROM audit_event ORDER BY position").fetchall() == before


def test_the_runtime_role_cannot_become_the_owner_or_change_the_schema(scratch: Scratch) -> None:
    with scratch.connect(scratch.runtime) as conn:
        _refused(conn, f'SET ROLE "{scratch.owner}"')
        _refused(conn, "CREATE TABLE forged (x int)")
        _refused(conn, "UPDATE django_migrations SET name = name")
        _refused(conn, "CREATE OR REPLACE FUNCTION audit_event_append_only() RETURNS trigger "
                       "AS $$ BEGIN RETURN NEW; END $$ LANGUAGE plpgsql")  # fmt: skip
        attributes = conn.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls FROM pg_roles "
            "WHERE rolname = current_user"
        ).fetchone()
    assert attributes == (False, False, False, False)


def test_the_runtime_role_has_ordinary_rights_on_the_other_tables(scratch: Scratch) -> None:
    with scratch.connect(scratch.runtime) as conn, conn.transaction():
        conn.execute(
            "INSERT INTO django_session (session_key, session_data, expire_date) "
            "VALUES ('k', 'd', now())"
        )
        conn.execute("UPDATE django_session SET session_data = 'e' WHERE session_key = 'k'")
        conn.execute("DELETE FROM django_session WHERE session_key = 'k'")
        raise psycopg.Rollback()


def test_the_product_appends_and_verifies_as_the_runtime_role(scratch: Scratch) -> None:
    assert scratch.verified.returncode == 0, scratch.verified.stderr
    with scratch.connect(scratch.runtime) as conn:
        types = [r[0] for r in conn.execute("SELECT type FROM audit_event ORDER BY position")]
    assert "audit.chain_verified" in types


def test_migrating_again_keeps_the_grants(scratch: Scratch) -> None:
    again = _manage("migrate", "--no-input", env=scratch.env)
    assert again.returncode == 0, again.stderr
    with scratch.connect(scratch.runtime) as conn:
        _refused(conn, "DELETE FROM audit_event")
        privileges = conn.execute(
            "SELECT privilege_type FROM information_schema.role_table_grants "
            "WHERE grantee = current_user AND table_name = 'audit_event' ORDER BY 1"
        ).fetchall()
    assert privileges == [("INSERT",), ("SELECT",)]


# --- the suite's own database, when the suite runs as the runtime role -----------------------------


@pytest.fixture
def as_runtime_role(db: Any) -> str:
    if connection.vendor != "postgresql":
        pytest.skip("database roles are a PostgreSQL matter")
    with connection.cursor() as cur:
        cur.execute("SELECT current_user, session_user")
        current, session = cur.fetchone()
    if not settings.SANDBOX_DB_RUNTIME_ROLE or current == session:
        pytest.skip("the suite runs as DATABASE_URL's role; CI runs it as the runtime role")
    assert current == settings.SANDBOX_DB_RUNTIME_ROLE
    return current


def _suite_refused(statement: str) -> str:
    with pytest.raises(DatabaseError) as caught, transaction.atomic(), connection.cursor() as cur:
        cur.execute(statement)
    return str(caught.value)


def test_the_suite_cannot_disable_triggers_nor_delete_or_update_events(
    as_runtime_role: str,
) -> None:
    append_user_events("1", 2)
    for table in audit_db.PROTECTED_TABLES:
        assert "must be owner" in _suite_refused(f"ALTER TABLE {table} DISABLE TRIGGER ALL")
        assert "permission denied" in _suite_refused(f"DELETE FROM {table}")
        column = _first_column(connection, table)
        assert "permission denied" in _suite_refused(f"UPDATE {table} SET {column} = {column}")
        assert "permission denied" in _suite_refused(f"TRUNCATE {table}")


# --- migrations ----------------------------------------------------------------------------------


def _operations(operations: list[Any]) -> Iterator[Any]:
    for op in operations:
        yield op
        if isinstance(op, migrations.SeparateDatabaseAndState):
            yield from _operations(op.database_operations)


def _sql_texts(value: Any) -> Iterator[str]:
    if value is None or value == migrations.RunSQL.noop:
        return
    if isinstance(value, str):
        yield value
    else:
        for item in value:
            yield from _sql_texts(item[0] if isinstance(item, tuple | list) else item)


def offending_operations() -> list[str]:
    """Every migration operation (of every app) that drops or disables the append-only triggers
    or removes a protected table; the audit app's reverse code is exempt because reversing it
    is refused (``audit.roles.refuse_reversing_the_log``)."""
    loader = MigrationLoader(None, ignore_no_migrations=True)
    found = []
    for (app, name), migration in sorted(loader.disk_migrations.items()):
        for op in _operations(migration.operations):
            where = f"{app}.{name}: {op.describe()}"
            if isinstance(op, migrations.RunSQL):
                texts = [*_sql_texts(op.sql)]
                if app != "audit":
                    texts += [*_sql_texts(op.reverse_sql)]
                found += [where for text in texts if _LIFTS_PROTECTION.search(text)]
            elif isinstance(op, migrations.RunPython):
                codes = [op.code] + ([op.reverse_code] if app != "audit" else [])
                for code in codes:
                    if code is None or code is migrations.RunPython.noop or code in _INSTALLERS:
                        continue
                    if _TOUCHES_PROTECTION.search(inspect.getsource(code)):
                        found.append(f"{where} ({code.__qualname__})")
            elif (
                app == "audit"
                and isinstance(
                    op,
                    migrations.DeleteModel | migrations.RenameModel | migrations.AlterModelTable,
                )
                and op.name.lower() in _PROTECTED_MODELS
            ):
                found.append(where)
    return found


def test_no_migration_lifts_the_append_only_protection() -> None:
    assert offending_operations() == []


def test_the_scan_finds_what_it_is_for() -> None:
    """The scan itself: each way of lifting the protection is found."""
    for sql in (
        "ALTER TABLE audit_event DISABLE TRIGGER USER",
        "DROP TRIGGER audit_digest_no_update_delete ON audit_digest",
        "SET session_replication_role = replica",
        'DROP TABLE IF EXISTS "audit_digestkey"',
        "TRUNCATE audit_event",
    ):
        assert _LIFTS_PROTECTION.search(sql), sql
    assert not _LIFTS_PROTECTION.search("CREATE TRIGGER audit_event_notify AFTER INSERT")
    assert _TOUCHES_PROTECTION.search(inspect.getsource(audit_db.uninstall))


@pytest.mark.django_db
@pytest.mark.parametrize("target", ["0001", "zero", "0002_append_only_triggers"])
def test_reversing_the_audit_migrations_is_refused(target: str) -> None:
    append_user_events("1", 1)
    with pytest.raises(CommandError, match="refused: reversing audit"):
        call_command("migrate", "audit", target, verbosity=0)
    # Nothing changed: the triggers still refuse, the events are there.
    with acting_as_owner(), pytest.raises(DatabaseError, match="append-only"):
        with transaction.atomic(), connection.cursor() as cur:
            cur.execute("DELETE FROM audit_event")
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM audit_event")
        assert cur.fetchone()[0] == 1


@pytest.mark.django_db
def test_migrating_forward_is_not_refused() -> None:
    call_command("migrate", verbosity=0)  # up to date: a no-op plan, no refusal
