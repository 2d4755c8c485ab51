"""Verify the event chain, the signed digests, the key history and the digest sink.

Exits 0 when intact; otherwise 1, naming the first bad position and what is wrong with it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from django.core.management.base import BaseCommand

from audit.actor import Actor
from audit.commands import verify_chain


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--json", action="store_true", help="print the report as JSON")
        parser.add_argument(
            "--since-bundle",
            metavar="EARLIER.zip",
            help="an evidence bundle exported earlier: the log must still hold its digests",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        report = verify_chain(
            Actor.system(channel="shell", name="verify_audit_chain"),
            since_bundle=options["since_bundle"],
        )
        if options["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "ok": report.ok,
                        "checked": report.checked,
                        "last_position": report.last_position,
                        "digests_checked": report.digests_checked,
                        "problem": None
                        if report.ok
                        else {
                            "position": report.problem.position,
                            "kind": report.problem.kind,
                            "detail": report.problem.detail,
                        },
                    }
                )
            )
        if report.ok:
            if not options["json"]:
                self.stdout.write(
                    f"OK: {report.checked} events, chain intact up to position "
                    f"{report.last_position}; {report.digests_checked} signed digests valid."
                )
            return
        if not options["json"]:
            self.stderr.write(
                f"TAMPERED: {report.problem} ({report.checked} events verified before it)"
            )
        sys.exit(1)
