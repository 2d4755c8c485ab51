"""django-q2's ``qcluster``, refused: it would start the cluster without the worker task guard
(any function a schedule row names would run). ``manage.py worker`` runs the cluster, guarded,
after reconciling this host's VMs."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        # Accepted as django-q2's are, so that a service file still using them gets the
        # explanation below rather than a usage error.
        parser.add_argument("--run-once", action="store_true")
        parser.add_argument("-n", "--name", dest="cluster_name", default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        raise CommandError(
            "manage.py qcluster is not used: it would run tasks without the worker task guard. "
            "Run `manage.py worker` (or `manage.py serve`) instead."
        )
