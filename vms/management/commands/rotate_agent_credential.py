"""Give a running VM's guest agent a fresh credential (``vms.guest.rotate_agent_credential``).

Run on the hypervisor host of the VM (it talks to the agent's socket there), e.g. after a
suspected leak of a credential. The old credential is refused from then on; the log records
``vm.agent_credential_rotated`` with reason ``requested``, never the value.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit.actor import Actor
from vms import guest
from vms.models import VirtualMachine


class Command(BaseCommand):
    help = "Give a running VM's guest agent a fresh credential (the old one is refused)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("vm", help="the VM's id")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            vm_id = uuid.UUID(options["vm"])
        except ValueError:
            raise CommandError(f"not a VM id: {options['vm']!r}") from None
        vm = VirtualMachine.objects.filter(pk=vm_id).first()
        if vm is None:
            raise CommandError(f"no VM {vm_id}")
        try:
            guest.rotate_agent_credential(
                vm, actor=Actor.system(channel="cli", name="rotate_agent_credential")
            )
        except guest.GuestUnavailable as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"VM {vm_id}: agent credential rotated\n")
