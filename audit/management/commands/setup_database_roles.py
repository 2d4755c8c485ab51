"""Set up PostgreSQL's two roles: the schema owner, which migrates, and the product's runtime role.

Run once, as a database administrator (a superuser, or the database's current owner with
CREATEROLE), against the product's database:

    python manage.py setup_database_roles --owner sandbox_owner --runtime sandbox_app \\
        --admin-url postgres://postgres@db:5432/sandbox

Creates (or fixes) both roles, makes the owner own the database, its schema and every table,
sequence and function in it, and grants the runtime role only what the product needs: SELECT
and INSERT on the append-only audit tables, SELECT on the migration history, ordinary reads and
writes elsewhere. Passwords are read from the environment variables named by
``--owner-password-env`` / ``--runtime-password-env`` (never from the command line). Then run
``migrate`` with ``DATABASE_OWNER_URL`` and the product with ``DATABASE_URL`` as the runtime
role; see docs/operations.md. Running it again is harmless.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote, urlparse

import psycopg
from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from audit.roles import RoleError, RolePlan, setup_roles


def _password(variable: str | None) -> str | None:
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise CommandError(f"the environment variable {variable} is not set or empty")
    return value


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--owner", required=True, help="the role that owns and migrates")
        parser.add_argument("--runtime", required=True, help="the role the product runs as")
        parser.add_argument(
            "--admin-url",
            help="connect as this administrator (default: the default database's settings)",
        )
        parser.add_argument("--owner-password-env", metavar="VAR")
        parser.add_argument("--runtime-password-env", metavar="VAR")
        parser.add_argument(
            "--owner-createdb",
            action="store_true",
            help="let the owner create databases (a test runner makes its test database)",
        )
        parser.add_argument(
            "--owner-can-act-as-runtime",
            action="store_true",
            help="let the owner SET ROLE to the runtime role: only for running the test suite "
            "as the runtime role; never in a deployment",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        plan = RolePlan(
            owner=options["owner"],
            runtime=options["runtime"],
            owner_password=_password(options["owner_password_env"]),
            runtime_password=_password(options["runtime_password_env"]),
            owner_createdb=options["owner_createdb"],
            owner_can_act_as_runtime=options["owner_can_act_as_runtime"],
        )
        if options["admin_url"]:
            url = options["admin_url"]
            database = unquote(urlparse(url).path.lstrip("/"))
            if not database:
                raise CommandError("--admin-url must name the product's database")
            conninfo = url
        else:
            settings_dict = connections["default"].settings_dict
            if settings_dict["ENGINE"] != "django.db.backends.postgresql":
                raise CommandError("database roles are for PostgreSQL; this database is not")
            database = settings_dict["NAME"]
            conninfo = psycopg.conninfo.make_conninfo(
                **{
                    k: v
                    for k, v in connections["default"].get_connection_params().items()
                    if k in {"host", "port", "user", "password", "dbname", "sslmode"}
                }
            )
        try:
            with psycopg.connect(conninfo) as conn, conn.cursor() as cur:
                done = setup_roles(cur, database, plan)  # one transaction: all or nothing
        except RoleError as exc:
            raise CommandError(str(exc)) from exc
        except psycopg.Error as exc:
            raise CommandError(f"the roles could not be set up, nothing changed: {exc}") from exc
        for line in done:
            self.stdout.write(line)
        self.stdout.write(
            self.style.SUCCESS(
                f"done: migrate as {plan.owner} (DATABASE_OWNER_URL), run the product as "
                f"{plan.runtime} (DATABASE_URL)"
            )
        )
