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


def test_a_vmm_whose_vm_was_recorded_while_the_reconciler_scanned_is_not_an_orphan(
    caller_for, vm_dirs, monkeypatch
) -> None:
    """The reconciler reads the VMs and pool members, then scans the host's processes: a VM
    created (or a member handed out as a VM) in between has a VMM the first read did not know.
    It is asked again before anything is killed; a VMM of no VM at all still goes."""
    from pathlib import Path

    from vms.hypervisors import reconcile as scanner
    from vms.hypervisors.base import RuntimeDir

    caller = caller_for("operator")
    made: list[str] = []

    def scan(root: Path, known_ids: Any = None) -> scanner.ReconcileReport:
        report = scanner.ReconcileReport()
        if made:  # a later scan (the fixtures' clean-up): nothing
            return report
        accepted = commands.create(caller, name="meanwhile", template="linux-small")
        key = accepted.vm_id.hex[:12]
        made.append(key)
        assert key not in known_ids  # recorded after the reads
        for vm_id, pid in ((key, 1_000_001), ("0123456789ab", 1_000_002)):
            report.orphans.append(
                scanner.OrphanVMM(vm_id, pid, RuntimeDir(Path(root) / vm_id), ("qemu",))
            )
        return report

    killed: list[str] = []
    monkeypatch.setattr(scanner, "scan", scan)
    monkeypatch.setattr(
        scanner, "teardown_orphans", lambda orphans: killed.extend(o.vm_id for o in orphans)
    )
    vm_dirs["run"].mkdir(parents=True, exist_ok=True)
    counts = reconcile.reconcile()
    assert killed == ["0123456789ab"] and counts["orphans"] == 1
    assert made and made[0] not in killed
