"""Create the first admin account if there is no user yet, and say how to log in."""

from __future__ import annotations

import os
import secrets
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from accounts import commands
from accounts.models import User
from audit.actor import Actor


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--username", default=os.environ.get("SANDBOX_ADMIN_USER", "admin"))

    def handle(self, *args: Any, **options: Any) -> None:
        path = settings.DATA_DIR / "secrets" / "admin_password"
        login = _login_url()
        if User.objects.exists():
            if path.exists():
                self.stdout.write(
                    f"Log in at {login} as {options['username']} with the password in {path}"
                )
            return
        password = os.environ.get("SANDBOX_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        try:
            commands.create_user(
                Actor.system(channel="shell", name="bootstrap_admin"),
                username=options["username"],
                password=password,
                role="admin",
            )
        except ValidationError as exc:  # e.g. a SANDBOX_ADMIN_PASSWORD the validators refuse
            raise CommandError("; ".join(exc.messages)) from exc
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_text(password + "\n")
        path.chmod(0o600)
        self.stdout.write(
            f"Created the first admin. Log in at {login} as "
            f"{options['username']} / {password}  (also kept in {path})"
        )


def _login_url() -> str:
    """The login page where ``serve`` listens (``SANDBOX_HOST``, ``SANDBOX_PORT``); a wildcard
    address is shown as this machine's loopback."""
    host = settings.SANDBOX_HOST
    if host in ("", "0.0.0.0"):  # noqa: S104 -- a comparison, not a bind
        host = "127.0.0.1"
    elif host == "::":
        host = "[::1]"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.SANDBOX_PORT}/accounts/login/"
