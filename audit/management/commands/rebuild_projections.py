"""Rebuild one projection (or all) from position 0."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from audit import projections
from audit.actor import Actor
from audit.commands import rebuild_projection


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("name", nargs="?", help="projection name; all when omitted")

    def handle(self, *args: Any, name: str | None = None, **options: Any) -> None:
        known = projections.registry()
        if name and name not in known:
            raise CommandError(f"no projection named {name!r}; known: {', '.join(sorted(known))}")
        actor = Actor.system(channel="shell", name="rebuild_projections")
        for each in [name] if name else sorted(known):
            count = rebuild_projection(actor, each)
            self.stdout.write(f"{each}: rebuilt from {count} events")
