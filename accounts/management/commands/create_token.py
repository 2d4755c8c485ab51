"""Create an API token for USER and print it once."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from accounts import commands
from accounts.models import User
from audit.actor import Actor


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("user")
        parser.add_argument("--name", default="cli", help="a label for the token")
        parser.add_argument(
            "--expires",
            type=int,
            default=90,
            metavar="DAYS",
            help="days until it expires (default 90)",
        )
        parser.add_argument("--no-expiry", action="store_true", help="a token that never expires")
        parser.add_argument("--read-only", action="store_true", help="the token may only read")
        parser.add_argument("--allow-ip", action="append", default=[], metavar="CIDR")
        parser.add_argument(
            "--scope",
            action="append",
            default=[],
            metavar="PERM",
            help="limit the token to this permission (repeat for more; docs/accounts.md)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        user = User.objects.filter(username=options["user"]).first()
        if user is None:
            raise CommandError(f"no user named {options['user']!r}")
        try:
            issued = commands.create_token(
                Actor.system(channel="shell", name="create_token"),
                user,
                name=options["name"],
                expires_days=None if options["no_expiry"] else options["expires"],
                read_only=options["read_only"],
                allowed_ips=options["allow_ip"],
                scopes=options["scope"],
            )
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from exc
        self.stdout.write(issued.plaintext)
        expiry = issued.token.expires_at.isoformat() if issued.token.expires_at else "never"
        self.stderr.write(
            f"token {issued.token.key} for {user.username}: expires {expiry}"
            f"{', read-only' if issued.token.read_only else ''}"
            f"{', scopes ' + ' '.join(issued.token.scopes) if issued.token.scopes else ''}."
            " It is shown only this once."
        )
