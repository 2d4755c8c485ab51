"""Seal every VM's and snapshot's agent credential again under the current secrets key
(``vms.agent.credentials.reencrypt_all``): run it after ``rotate_secrets`` and before a secrets
key is retired, or the VMs whose credentials are sealed under it can no longer be reached. The
credentials themselves, and so the guests, are unchanged (``rotate_agent_credential`` changes
one)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from vms.agent import credentials


class Command(BaseCommand):
    help = "Seal every agent credential again under the current secrets key."

    def handle(self, *args: Any, **options: Any) -> None:
        done = credentials.reencrypt_all()
        self.stdout.write(f"{done} agent credential(s) sealed again under the current key\n")
