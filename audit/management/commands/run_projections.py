"""Advance the followed projections to the head of the log (the worker does this on a schedule)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from audit.projections import run_pending


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(f"applied {run_pending()} events")
