"""Retire a former control-plane key: ``retire_key token-pepper|digest-key|django-secret KEY_ID``.

What only that key accepts stops working: tokens still hashed with a retired pepper (refused
while live ones remain, unless ``--force``), sessions and signed links made under a retired
Django secret. A retired Ed25519 digest key loses its private half only: digests it signed stay
verifiable. The current key cannot be retired. Each retirement is a ``key.retired`` event.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from accounts import commands
from audit import commands as audit_commands
from audit.actor import Actor

KINDS = ("token-pepper", "digest-key", "django-secret")


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("kind", choices=KINDS)
        parser.add_argument("key_id")
        parser.add_argument(
            "--force",
            action="store_true",
            help="retire a token pepper even though live tokens still use it (they stop working)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        kind, key_id = options["kind"], options["key_id"]
        actor = Actor.system(channel="shell", name="retire_key")
        try:
            if kind == "token-pepper":
                commands.retire_token_pepper(actor, key_id, force=options["force"])
            elif kind == "digest-key":
                audit_commands.retire_digest_key(actor, key_id)
            else:
                commands.retire_django_secret(actor, key_id)
        except audit_commands.KeyRotationRefused as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"retired {kind} {key_id}")
        if kind != "digest-key":
            self.stdout.write("restart the web and worker processes")
