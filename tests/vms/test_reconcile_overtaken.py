"""The reconciler settles an interrupted start only while the VM still waits for it: a destroy
that comes in while it checks the guest wins, as it does against the worker."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from audit.models import Event
from vms import commands, reconcile, worker
from vms.models import VirtualMachine

pytestmark = pytest.mark.django_db


def test_an_interrupted_start_overtaken_by_a_destroy_is_not_settled_as_started(
    caller_for, vm_dirs, monkeypatch
) -> None:
    caller = caller_for("operator")
    created = commands.create(caller, name="interrupted", template="linux-small")
    assert worker.claim(created.request)
    vm = VirtualMachine.objects.get(pk=created.vm_id)

    def agent(vm: Any, timeout: float = 0) -> Any:
        return contextlib.nullcontext()

    def destroyed_meanwhile(vm: Any) -> None:
        commands.destroy(caller, VirtualMachine.objects.get(pk=vm.pk))

    monkeypatch.setattr(worker, "_agent", agent)
    monkeypatch.setattr(worker, "_configure_identity", destroyed_meanwhile)
    assert reconcile._settle(vm, alive=True) == "superseded"
    outcome = Event.objects.get(causation_id=created.request.event_id, type__startswith="vm.start")
    assert outcome.type == "vm.start_failed"
    assert outcome.payload["superseded"] is True and outcome.payload["vmm_launched"] is True
    vm.refresh_from_db()
    assert vm.state == "destroying" and vm.pending_type == "vm.destroy_requested"
