"""The reconciler records a running VM whose VMM is gone as crashed (through the commands)."""

from __future__ import annotations

import pytest

from audit.models import Event
from vms import reconcile
from vms.models import VirtualMachine

pytestmark = pytest.mark.django_db


def test_a_running_vm_without_its_vmm_is_recorded_as_crashed(caller_for, make_running_vm) -> None:
    vm = make_running_vm(caller_for("operator"))
    assert reconcile.reconcile()["crashed"] == 1
    crashed = Event.objects.get(aggregate_id=str(vm.pk), type="vm.crashed")
    assert crashed.actor_name == "reconciler"
    assert crashed.payload["reason"] == "the VMM process is gone"
    vm = VirtualMachine.objects.get(pk=vm.pk)
    assert vm.state == "crashed"
    assert reconcile.reconcile()["crashed"] == 0  # once
