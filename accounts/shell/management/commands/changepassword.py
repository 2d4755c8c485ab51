"""Change a user's password (a ``user.password_changed`` event), in place of Django's command,
which would change it with no event."""

from __future__ import annotations

import getpass
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from accounts import commands
from accounts.models import User
from audit.actor import Actor


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("username", nargs="?", default=getpass.getuser())
        parser.add_argument("--database", default="default", help="the only database: default")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["database"] != "default":
            raise CommandError("only the default database holds users")
        user = User.objects.filter(username=options["username"]).first()
        if user is None:
            raise CommandError(f"no user named {options['username']!r}")
        self.stdout.write(f"Changing password for user {user.username!r}")
        for _ in range(3):
            first = getpass.getpass("Password: ")
            if first != getpass.getpass("Password (again): "):
                self.stderr.write("Passwords do not match. Please try again.")
                continue
            try:
                commands.change_password(
                    Actor.system(channel="shell", name="changepassword"), user, first
                )
            except ValidationError as exc:
                self.stderr.write("; ".join(exc.messages))
                continue
            self.stdout.write(f"Password changed successfully for user {user.username!r}")
            return
        raise CommandError(f"Aborting password change for user {user.username!r} after 3 attempts")
