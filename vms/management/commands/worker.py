"""Run this host's worker: reconcile VMs with the VMM processes that exist, then the django-q2
cluster. Interrupted requests are settled before new work is taken."""

from __future__ import annotations

import os
import sys
from typing import Any

from django.core.management.base import BaseCommand

from sandbox_site import context


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args: Any, **options: Any) -> None:
        from vms.reconcile import reconcile

        with context.bind(channel="worker"):
            counts = reconcile(startup=True)
        self.stdout.write("reconciled: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        sys.stdout.flush()
        manage = os.path.join(os.getcwd(), "manage.py")
        os.execv(sys.executable, [sys.executable, manage, "qcluster"])  # noqa: S606 - fixed argv
