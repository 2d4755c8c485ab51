"""Encrypt every webhook signing secret again under the current key of SANDBOX_SECRETS_KEYS.

Run it with ``rotate_secrets`` after putting a new key first; the hourly maintenance task does
it too. Retire an old key only once this reports no failures.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from secretstore import crypto
from webhooks import commands


class Command(BaseCommand):
    help = "Re-encrypt every webhook signing secret under the current key of SANDBOX_SECRETS_KEYS."

    def handle(self, *args: Any, **options: Any) -> None:
        done, failed = commands.reseal_all()
        self.stdout.write(
            f"re-encrypted {done} webhook secrets under {crypto.keyring().current_id}"
        )
        for line in failed:
            self.stderr.write(f"not readable: {line}")
        if failed:
            raise CommandError(f"{len(failed)} webhook secrets could not be read: keep their keys")
