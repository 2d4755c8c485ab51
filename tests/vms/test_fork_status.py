"""A fork's progress (vms.forks.status) from the log and the read model, without guests: its N
new VMs counted as running, failed or pending by their states, whatever became of its snapshot,
in a constant number of queries."""

from __future__ import annotations

from typing import Any

import pytest

from tests.audit.querycount import exact_queries
from vms import commands, enqueue, forks, worker
from vms.models import VirtualMachine

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def no_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(enqueue, "request", lambda event_id: None)


def running_vm(caller: Any, name: str = "src") -> VirtualMachine:
    accepted = commands.create(caller, name=name, template="linux-small")
    commands.record_outcome(accepted.request, "vm.started", {"host": "h1", "hypervisor": "qemu"})
    return VirtualMachine.objects.get(pk=accepted.vm_id)


def test_a_forks_status_counts_its_vms_as_they_settle(caller_for: Any) -> None:
    owner = caller_for("operator")
    vm = running_vm(owner)
    forked = commands.fork(owner, vm, count=3)
    status = forks.status(owner, vm, forked.snapshot.pk)
    assert status is not None
    assert (status["count"], status["pending"], status["settled"], status["done"]) == (
        3,
        3,
        0,
        False,
    )
    assert status["request_id"] == str(forked.request.event_id)
    assert [v["name"] for v in status["vms"]] == ["src-fork-1", "src-fork-2", "src-fork-3"]
    first, second, third = forked.vms
    commands.record_outcome(first.request, "vm.restored", {"host": "h1", "hypervisor": "qemu"})
    commands.record_outcome(second.request, "vm.restore_failed", {"reason": "no room"})
    status = forks.status(owner, vm, forked.snapshot.pk)
    assert status is not None
    counts = {k: status[k] for k in ("running", "failed", "pending", "other", "settled")}
    assert counts == {"running": 1, "failed": 1, "pending": 1, "other": 0, "settled": 2}
    assert [v["phase"] for v in status["vms"]] == ["running", "failed", "pending"]
    assert status["vms"][1]["last_error"]
    commands.record_outcome(third.request, "vm.restored", {"host": "h1", "hypervisor": "qemu"})
    # A VM stopped since counts as neither running nor failed: "other".
    commands.perform(owner, VirtualMachine.objects.get(pk=first.vm_id), "stop")
    status = forks.status(owner, vm, forked.snapshot.pk)
    assert status is not None and status["done"] is True
    assert (status["running"], status["failed"], status["other"]) == (1, 1, 1)


def test_a_failed_snapshot_fails_every_vm_of_the_fork(caller_for: Any) -> None:
    owner = caller_for("operator")
    vm = running_vm(owner)
    forked = commands.fork(owner, vm, count=2)
    commands.record_outcome(
        forked.request,
        "vm.snapshot_failed",
        {"reason": "disk full", "state": "running", "snapshot_id": str(forked.snapshot.pk)},
    )
    status = forks.status(owner, vm, forked.snapshot.pk)
    assert status is not None and status["pending"] == 2  # the restores are not carried out yet
    for accepted in forked.vms:
        worker.handle(str(accepted.request.event_id))
    status = forks.status(owner, vm, forked.snapshot.pk)
    assert status is not None
    assert (status["failed"], status["pending"], status["done"]) == (2, 0, True)
    assert status["snapshot"]["state"] == "failed"


def test_only_a_fork_of_this_vm_has_a_status_and_others_vms_are_counted_not_listed(
    caller_for: Any,
) -> None:
    owner = caller_for("operator")
    vm = running_vm(owner)
    forked = commands.fork(owner, vm, count=2)
    other = running_vm(owner, "other")
    assert forks.status(owner, other, forked.snapshot.pk) is None
    plain = commands.perform(owner, other, "snapshot", name="plain")  # not a fork's
    assert forks.status(owner, other, plain.snapshot.pk) is None
    # An admin sees the VMs; another operator who may see the source (none here but admins and
    # viewers) would get the counts over all N and only the VMs it sees.
    viewer = caller_for("viewer")
    status = forks.status(viewer, vm, forked.snapshot.pk)
    assert status is not None and status["count"] == 2 and len(status["vms"]) == 2


@pytest.mark.parametrize("count", [1, 5])
def test_a_forks_status_reads_a_constant_number_of_queries(caller_for: Any, count: int) -> None:
    owner = caller_for("operator")
    vm = running_vm(owner)
    forked = commands.fork(owner, vm, count=count)
    with exact_queries(4):
        status = forks.status(owner, vm, forked.snapshot.pk)
    assert status is not None and status["count"] == count
