"""Sign a digest over the events since the last digest.

Refused, with exit status 1 and an ``audit.digest_signing_failed`` event naming the break, when
the chain since the last digest, the last digest, its copy in the digest sink or the key
history is broken: a signature must never vouch for a log that is already tampered with.
"""

from __future__ import annotations

import sys
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand

from audit import sink
from audit.actor import Actor
from audit.commands import sign_digest
from audit.digests import ChainBroken


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--idle",
            action="store_true",
            help="sign even when no event was appended (what the worker does every minute)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        actor = Actor.system(channel="shell", name="sign_audit_digest")
        try:
            digest = sign_digest(actor, scheduled=options["idle"])
        except ChainBroken as exc:
            self.stderr.write(f"REFUSED: the chain is broken: {exc}")
            sys.exit(1)
        except (ImproperlyConfigured, sink.SinkError) as exc:
            self.stderr.write(f"REFUSED: {exc}")
            sys.exit(1)
        if digest is None:
            self.stdout.write("nothing to sign: no events since the last digest")
        else:
            self.stdout.write(
                f"signed digest {digest.sequence}: positions {digest.start_position}.."
                f"{digest.end_position} with {digest.key_id}"
            )
