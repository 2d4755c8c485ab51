"""Sign a digest over the events since the last digest."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from audit.actor import Actor
from audit.commands import sign_digest


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args: Any, **options: Any) -> None:
        digest = sign_digest(Actor.system(channel="shell", name="sign_audit_digest"))
        if digest is None:
            self.stdout.write("nothing to sign: no events since the last digest")
        else:
            self.stdout.write(
                f"signed positions {digest.start_position}..{digest.end_position} "
                f"with {digest.key_id}"
            )
