"""Encrypt every secret again under the current key (the first of SANDBOX_SECRETS_KEYS).

Run after putting a new key first in SANDBOX_SECRETS_KEYS (the old ones still listed); retire
an old key (remove it from the setting) only once this reports no failures. ``--background``
hands the work to the worker (``secretstore.tasks.reencrypt``) instead.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django_q.tasks import async_task

from secretstore import commands, crypto
from secretstore.commands import RotationReport


class Command(BaseCommand):
    help = "Re-encrypt every secret under the current key of SANDBOX_SECRETS_KEYS."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--background", action="store_true", help="enqueue it for the worker and return"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        ring = crypto.keyring()
        if options["background"]:
            task_id = async_task("secretstore.tasks.reencrypt", task_name="secrets-reencrypt")
            self.stdout.write(f"enqueued re-encryption under {ring.current_id} (task {task_id})")
            return

        def progress(report: RotationReport) -> None:
            done = report.reencrypted + report.already_current + len(report.failed or [])
            self.stdout.write(f"{done}/{report.total} (re-encrypted {report.reencrypted})")

        self.stdout.write(f"current key {ring.current_id}; configured: {', '.join(ring.key_ids)}")
        report = commands.reencrypt_all(progress=progress)
        self.stdout.write(
            f"re-encrypted {report.reencrypted} of {report.total} under {report.current_key}"
        )
        if report.failed:
            for line in report.failed:
                self.stderr.write(f"not readable: {line}")
            raise CommandError(
                f"{len(report.failed)} secrets could not be read: keep their keys configured"
            )
