"""A destroy that overtakes a start in flight: the VM never runs again, and the log says so.

The worker's handler runs for real (real QEMU guests) in a thread, as one worker of a cluster
would, while the test destroys the VM the way a second worker would: before the start launched
its VMM, and after. Afterwards the VM is destroyed, no VMM of it is left, the start's outcome
says it was overtaken (never ``vm.started`` after ``vm.destroyed``), and the quota counts no VM.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connections

from audit.models import Event
from tests.vms.conftest import wait_for
from vms import commands, worker
from vms.hypervisors import reconcile as scanner
from vms.models import Quota, Usage, VirtualMachine
from vms.projectors import OUTCOMES
from vms.runtime import runtime_dir

pytestmark = [pytest.mark.guest, pytest.mark.django_db(transaction=True)]


def vmm_alive(vm_id: Any) -> int | None:
    pid = runtime_dir(vm_id).pid()
    return pid if pid and os.path.exists(f"/proc/{pid}") else None


def in_thread(fn: Callable[..., Any], *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            result["error"] = exc
        finally:
            connections.close_all()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def timeline(vm_id: Any) -> list[tuple[str, dict[str, Any]]]:
    return [
        (e.type, e.payload)
        for e in Event.objects.filter(aggregate_type="vm", aggregate_id=str(vm_id))
        .exclude(type="vm.progress")
        .order_by("position")
    ]


def destroy_now(caller: Any, vm_id: Any) -> None:
    accepted = commands.destroy(caller, VirtualMachine.objects.get(pk=vm_id))
    assert worker.handle(accepted.request.event_id) == "vm.destroyed"


def assert_destroyed_for_good(vm_id: Any, start_request: str, *, vms_in_use: int = 0) -> None:
    vm = VirtualMachine.objects.get(pk=vm_id)
    assert vm.state == "destroyed", (vm.state, timeline(vm_id))
    assert vmm_alive(vm_id) is None
    types = [t for t, _ in timeline(vm_id)]
    assert "vm.started" not in types[types.index("vm.destroyed") :], types
    outcome = Event.objects.get(causation_id=start_request, type__in=list(OUTCOMES))
    assert outcome.type == "vm.start_failed" and outcome.payload["superseded"] is True, (
        outcome.payload
    )
    assert "destroyed" in outcome.payload["reason"]
    assert Usage.objects.get(user=vm.owner).vms == vms_in_use


@pytest.mark.parametrize("when", ["claimed", "launched"])
def test_destroy_during_a_start_keeps_the_vm_destroyed(caller_for, vm_dirs, when) -> None:
    caller = caller_for("operator")
    created = commands.create(caller, name="racer", template="linux-small")
    vm_id, start_id = created.vm_id, created.request.event_id
    thread, result = in_thread(worker.handle, start_id)
    if when == "claimed":
        wait_for(lambda: worker.is_claimed(created.request), 60, "the start to be claimed", 0.01)
    else:
        wait_for(lambda: vmm_alive(vm_id), 180, "the start to launch the VMM", 0.02)
    destroy_now(caller, vm_id)
    thread.join(240)
    assert not thread.is_alive()
    assert result.get("value") == "superseded", result
    assert_destroyed_for_good(vm_id, start_id)
    if when == "launched":
        outcome = Event.objects.get(causation_id=start_id, type="vm.start_failed")
        assert outcome.payload["vmm_launched"] is True
    report = scanner.scan(vm_dirs["run"], known_ids=[])
    assert report.orphans == [], report.orphans


def test_a_vm_destroyed_mid_start_never_runs_beside_its_successor(caller_for, vm_dirs) -> None:
    caller = caller_for("operator")
    Quota.objects.create(user=caller.user, max_vms=1)
    first = commands.create(caller, name="first", template="linux-small")
    thread, result = in_thread(worker.handle, first.request.event_id)
    wait_for(lambda: vmm_alive(first.vm_id), 180, "the first VM's VMM", 0.02)
    destroy_now(caller, first.vm_id)
    # Once the log says destroyed, its VMM is gone: the quota's room is real.
    assert vmm_alive(first.vm_id) is None
    second = commands.create(caller, name="second", template="linux-small")
    assert worker.handle(second.request.event_id) == "vm.started"
    thread.join(240)
    assert not thread.is_alive() and result.get("value") == "superseded", result
    try:
        assert vmm_alive(first.vm_id) is None
        assert vmm_alive(second.vm_id)
        running = VirtualMachine.objects.filter(owner=caller.user).exclude(state="destroyed")
        assert [vm.name for vm in running] == ["second"]
        assert running[0].state == "running"
        assert Usage.objects.get(user=caller.user).vms == 1
        assert_destroyed_for_good(first.vm_id, first.request.event_id, vms_in_use=1)
    finally:
        destroy_now(caller, second.vm_id)
    assert vmm_alive(second.vm_id) is None
