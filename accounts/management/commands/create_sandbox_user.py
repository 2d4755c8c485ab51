"""Create a user with a role (admin, operator, viewer, auditor)."""

from __future__ import annotations

import getpass
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from accounts import commands, roles
from audit.actor import Actor


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("username")
        parser.add_argument("--role", choices=roles.ROLES, required=True)
        parser.add_argument("--email", default="")
        parser.add_argument("--password", help="omit to be asked (or use --no-password)")
        parser.add_argument("--no-password", action="store_true", help="API tokens only")

    def handle(self, *args: Any, **options: Any) -> None:
        password = options["password"]
        if password is None and not options["no_password"]:
            password = getpass.getpass("Password: ")
        try:
            user = commands.create_user(
                Actor.system(channel="shell", name="create_sandbox_user"),
                username=options["username"],
                password=password,
                role=options["role"],
                email=options["email"],
            )
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from exc
        self.stdout.write(f"created {user.username} ({options['role']})")
