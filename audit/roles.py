"""Least privilege in PostgreSQL: a role that owns the schema and one that the product runs as.

The **owner** owns the schema, the tables and the trigger functions, and runs ``migrate``; only
an owner (or a superuser) can ``ALTER TABLE ... DISABLE TRIGGER`` or drop a table. The
**runtime** role is what the web processes and workers log in as: ``SELECT`` and ``INSERT`` on
the append-only audit tables (``audit.db.PROTECTED_TABLES``: events, digests, the key history),
``SELECT`` on the migration history, ordinary ``SELECT, INSERT, UPDATE, DELETE`` on every other
table, and nothing else: no ``UPDATE``, ``DELETE`` or ``TRUNCATE`` of the log, no DDL, no
ownership, no membership in the owner. The append-only triggers refuse changes even to the owner;
the grants make sure the product's own credentials cannot lift them.

``setup_roles`` (``manage.py setup_database_roles``, run once by a database administrator)
creates the two roles, hands the database, the schema and every object in it to the owner, and
grants the runtime role its privileges. ``grant_runtime`` re-applies the grants and is run by
the owner after every ``migrate`` (``audit.apps``), so a table a migration adds is granted as
its kind requires. docs/operations.md describes the set-up.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.management.base import CommandError
from django.db import connections, transaction
from psycopg import sql

from audit.db import PROTECTED_TABLES

__all__ = [
    "READ_ONLY_TABLES",
    "RoleError",
    "RolePlan",
    "grant_runtime",
    "runtime_grant_statements",
    "setup_roles",
]

# The migration history: the product reads it (Django's start-up check), only the owner writes.
READ_ONLY_TABLES = ("django_migrations",)


class RoleError(Exception):
    """The roles cannot be set up as asked (a clear message for the operator)."""


@dataclass(frozen=True)
class RolePlan:
    owner: str
    runtime: str
    owner_password: str | None = None
    runtime_password: str | None = None
    # The owner may create databases (pytest's test database is made by the owner).
    owner_createdb: bool = False
    # The owner may SET ROLE to the runtime role: the test suite acts as the runtime role and
    # lifts the triggers as the owner, in one session. Never for a deployment.
    owner_can_act_as_runtime: bool = False
    schema: str = "public"


def _role_exists(cur: Any, name: str) -> bool:
    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [name])
    return cur.fetchone() is not None


def _tables(cur: Any, schema: str) -> list[str]:
    cur.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm') ORDER BY c.relname",
        [schema],
    )
    return [row[0] for row in cur.fetchall()]


def runtime_grant_statements(
    tables: Iterable[str], owner: str, runtime: str, schema: str = "public"
) -> list[sql.Composed]:
    """What the runtime role may do on the schema's current and future tables."""
    s, r, o = sql.Identifier(schema), sql.Identifier(runtime), sql.Identifier(owner)
    statements = [
        sql.SQL("REVOKE CREATE ON SCHEMA {} FROM PUBLIC").format(s),
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, r),
        sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM {}").format(s, r),
        sql.SQL("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {} TO {}").format(s, r),
        # A table a later migration adds may be append-only: it starts with reading and adding
        # only, and this function (after the migration) grants the rest where it belongs.
        sql.SQL(
            "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT SELECT, INSERT ON TABLES TO {}"
        ).format(o, s, r),
        sql.SQL(
            "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} "
            "GRANT USAGE, SELECT ON SEQUENCES TO {}"
        ).format(o, s, r),
    ]
    for table in tables:
        t = sql.Identifier(schema, table)
        if table in PROTECTED_TABLES:
            privileges = "SELECT, INSERT"
        elif table in READ_ONLY_TABLES:
            privileges = "SELECT"
        else:
            privileges = "SELECT, INSERT, UPDATE, DELETE"
        statements.append(sql.SQL(f"GRANT {privileges} ON {{}} TO {{}}").format(t, r))
        # Nobody but the owner gets more through PUBLIC either.
        statements.append(sql.SQL("REVOKE ALL ON {} FROM PUBLIC").format(t))
    return statements


def _check_runtime_is_unprivileged(cur: Any, owner: str, runtime: str) -> None:
    cur.execute(
        "SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication "
        "FROM pg_roles WHERE rolname = %s",
        [runtime],
    )
    row = cur.fetchone()
    if row is None:
        raise RoleError(f"the runtime role {runtime!r} does not exist")
    if any(row):
        raise RoleError(
            f"the runtime role {runtime!r} must not be a superuser nor create roles or databases, "
            "bypass row security or replicate"
        )
    cur.execute("SELECT pg_has_role(%s, %s, 'MEMBER')", [runtime, owner])
    if cur.fetchone()[0]:
        raise RoleError(
            f"the runtime role {runtime!r} is a member of the owner {owner!r}: it could act as "
            "the owner and lift the append-only triggers"
        )


def grant_runtime(cursor: Any, owner: str, runtime: str, schema: str = "public") -> None:
    """Re-apply the runtime role's grants on every table of the schema (run as the owner)."""
    if owner == runtime:
        raise RoleError("the runtime role must be another role than the owner")
    _check_runtime_is_unprivileged(cursor, owner, runtime)
    for statement in runtime_grant_statements(_tables(cursor, schema), owner, runtime, schema):
        cursor.execute(statement)


def setup_roles(cursor: Any, database: str, plan: RolePlan) -> list[str]:
    """Create or fix the two roles and hand everything to the owner (run as an administrator).

    Idempotent. Returns what was done, one line each.
    """
    if plan.owner == plan.runtime:
        raise RoleError("the owner and the runtime role must be two different roles")
    done: list[str] = []
    o, r, s = sql.Identifier(plan.owner), sql.Identifier(plan.runtime), sql.Identifier(plan.schema)
    for name, password, attributes in (
        (
            plan.owner,
            plan.owner_password,
            "LOGIN NOSUPERUSER NOCREATEROLE NOREPLICATION NOBYPASSRLS "
            + ("CREATEDB" if plan.owner_createdb else "NOCREATEDB"),
        ),
        (
            plan.runtime,
            plan.runtime_password,
            "LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB NOREPLICATION NOBYPASSRLS",
        ),
    ):
        verb = "ALTER" if _role_exists(cursor, name) else "CREATE"
        statement = sql.SQL(f"{verb} ROLE {{}} {attributes}").format(sql.Identifier(name))
        if password is not None:
            statement = sql.SQL("{} PASSWORD {}").format(statement, sql.Literal(password))
        cursor.execute(statement)
        done.append(f"{verb.lower()}d role {name}")
    cursor.execute(
        "SELECT r.rolname, m.rolname FROM pg_auth_members a JOIN pg_roles r ON r.oid = a.roleid "
        "JOIN pg_roles m ON m.oid = a.member WHERE m.rolname = %s",
        [plan.runtime],
    )
    for granted, _member in cursor.fetchall():
        # The runtime role belongs to no other role: it would inherit that role's privileges.
        cursor.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(granted), r))
        done.append(f"revoked membership of {plan.runtime} in {granted}")
    if plan.owner_can_act_as_runtime:
        cursor.execute(sql.SQL("GRANT {} TO {}").format(r, o))
        done.append(f"{plan.owner} may SET ROLE {plan.runtime} (test suites only)")
    else:
        cursor.execute(sql.SQL("REVOKE {} FROM {}").format(r, o))

    db = sql.Identifier(database)
    cursor.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(db, o))
    cursor.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(db, r))
    cursor.execute(sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(s, o))
    done.append(f"database {database} and schema {plan.schema} owned by {plan.owner}")

    cursor.execute(
        "SELECT c.relname, c.relkind FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') "
        "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass "
        "AND d.objid = c.oid AND d.deptype IN ('a', 'i', 'e')) "  # owned sequences follow
        "AND pg_get_userbyid(c.relowner) <> %s",
        [plan.schema, plan.owner],
    )
    moved = cursor.fetchall()
    kinds = {"S": "SEQUENCE", "v": "VIEW", "m": "MATERIALIZED VIEW", "f": "FOREIGN TABLE"}
    for name, kind in moved:
        cursor.execute(
            sql.SQL(f"ALTER {kinds.get(kind, 'TABLE')} {{}} OWNER TO {{}}").format(
                sql.Identifier(plan.schema, name), o
            )
        )
    cursor.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = %s AND p.prokind = 'f' AND pg_get_userbyid(p.proowner) <> %s "
        "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass "
        "AND d.objid = p.oid AND d.deptype = 'e')",  # an extension's functions stay its own
        [plan.schema, plan.owner],
    )
    functions = [row[0] for row in cursor.fetchall()]
    for signature in functions:
        # regprocedure text is a quoted, schema-qualified signature, safe to splice.
        cursor.execute(sql.SQL(f"ALTER FUNCTION {signature} OWNER TO {{}}").format(o))
    done.append(f"{len(moved)} relations and {len(functions)} functions now owned by {plan.owner}")

    # The default privileges are the owner's: set them as the owner would.
    grant_runtime(cursor, plan.owner, plan.runtime, plan.schema)
    done.append(
        f"{plan.runtime}: SELECT, INSERT on {', '.join(PROTECTED_TABLES)}; SELECT on "
        f"{', '.join(READ_ONLY_TABLES)}; SELECT, INSERT, UPDATE, DELETE on the other tables"
    )
    return done


def refuse_reversing_the_log(sender: Any = None, plan: Any = None, **kwargs: Any) -> None:
    """pre_migrate: refuse any plan that would unapply an audit migration, before it starts.

    Unapplying them drops the append-only triggers, then the key history and the log itself;
    Django would unapply the later migrations before reaching one that cannot be reversed, so
    the whole plan is refused up front. The log's schema only ever moves forward.
    """
    backwards = [m for m, is_backwards in plan or () if is_backwards and m.app_label == "audit"]
    if backwards:
        names = ", ".join(f"{m.app_label}.{m.name}" for m in backwards)
        raise CommandError(
            f"refused: reversing {names} would remove the audit log's append-only protection "
            "or its tables; the audit schema only moves forward. Nothing was changed."
        )


def grant_after_migrate(sender: Any = None, using: str = "default", **kwargs: Any) -> None:
    """post_migrate: as the owner that just migrated, grant the runtime role again.

    Only after ``migrate`` (a flush also sends post_migrate, without a plan) and only when a
    runtime role is configured (``SANDBOX_DB_RUNTIME_ROLE``) on PostgreSQL.
    """
    runtime = getattr(settings, "SANDBOX_DB_RUNTIME_ROLE", "")
    connection = connections[using]
    if kwargs.get("plan") is None or not runtime or connection.vendor != "postgresql":
        return
    with transaction.atomic(using=using):
        connection.ensure_connection()
        with connection.connection.cursor() as cur:
            cur.execute("SELECT current_user")
            owner = cur.fetchone()[0]
            if owner == runtime:  # migrating as the runtime role changes nothing it could grant
                return
            try:
                grant_runtime(cur, owner, runtime)
            except RoleError as exc:
                raise CommandError(
                    f"migrated, but the runtime role could not be granted: {exc} "
                    "(see manage.py setup_database_roles)"
                ) from exc
