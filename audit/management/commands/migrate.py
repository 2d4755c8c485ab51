"""Django's ``migrate``, logged in as the schema owner when ``DATABASE_OWNER_URL`` is set.

The product's own role (``DATABASE_URL``) cannot change the schema; the owner can. With the
owner configured, this process's default connection logs in as the owner for the whole run, so
schema changes, data migrations and the receivers after them all act as the owner; then the
runtime role is granted its privileges again (``audit.roles.grant_after_migrate``). Reversing
the audit app's migrations is refused (``audit.roles.refuse_reversing_the_log``).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.commands.migrate import Command as DjangoMigrate
from django.db import DEFAULT_DB_ALIAS, connections


def log_in_as_owner(alias: str) -> str | None:
    """Switch ``alias`` to the owner's login when it is the configured database; the owner."""
    owner = getattr(settings, "SANDBOX_DB_OWNER", {})
    if not owner or alias != DEFAULT_DB_ALIAS:
        return None
    connection = connections[alias]
    # A test run renames the default database to its test database before migrating it: that
    # one is made by the test login, as the test runner expects.
    if connection.settings_dict["NAME"] != owner["NAME"]:
        return None
    connection.close()
    if hasattr(connection, "close_pool"):
        connection.close_pool()
    connection.settings_dict.update(USER=owner["USER"], PASSWORD=owner["PASSWORD"])
    return owner["USER"]


class Command(DjangoMigrate):
    help = DjangoMigrate.help + " Logged in as the schema owner when DATABASE_OWNER_URL is set."

    def handle(self, *args: Any, **options: Any) -> Any:
        owner = log_in_as_owner(options["database"])
        if owner and options["verbosity"] >= 1:
            self.stdout.write(f"Migrating as the schema owner {owner}.")
        return super().handle(*args, **options)
