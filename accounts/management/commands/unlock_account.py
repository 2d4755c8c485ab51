"""Lift the lockout of a username after repeated failed logins (an ``auth.unlocked`` event)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from accounts import commands
from audit.actor import Actor


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("username")

    def handle(self, *args: Any, **options: Any) -> None:
        username = options["username"]
        if not commands.unlock(Actor.system(channel="shell", name="unlock_account"), username):
            raise CommandError(f"{username} is not locked")
        self.stdout.write(f"unlocked {username}")
