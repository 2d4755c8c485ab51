"""The statements of VM commands, pinned by count (see ``tests.audit.querycount``).

Each command checks permission, state and quota under the append lock and appends its request,
the VM read model projected in the same transaction: these counts say what that costs, so an
extra read under the lock or a costlier projection write shows up here.
"""

from __future__ import annotations

import pytest

from tests.audit.querycount import exact_queries
from vms import commands, policy
from vms.models import VirtualMachine

pytestmark = pytest.mark.django_db

# The task log's projection of a request (vms.projectors.TaskProjector), in the same transaction:
# the VM's older pending request marked superseded, the new task's row. Then one UPDATE saves
# the checkpoints of every projection the append fed (audit.projections.apply_inline).
TASK_LOG = ["UPDATE", "INSERT"]
CHECKPOINTS = "UPDATE"


def _running(caller) -> VirtualMachine:
    accepted = commands.create(caller, name="box", template="linux-small")
    commands.record_outcome(accepted.request, "vm.started", {"host": "h1", "hypervisor": "qemu"})
    return policy.visible_vms(caller).get(pk=accepted.vm_id)  # as the API reads it


def test_stop_reads_the_vm_under_the_lock_appends_and_projects(caller_for) -> None:
    caller = caller_for("operator")
    vm = _running(caller)
    with exact_queries(8) as sql:
        commands.stop(caller, vm)
    # The VM under the lock, the head, the INSERT; the VM projection (the row, its UPDATE); the
    # task log's (the older pending request superseded, the new task): TASK_LOG; the two
    # projections' checkpoints in one statement.
    kinds = [s.split()[0] for s in sql]
    assert kinds == ["SELECT", "SELECT", "INSERT", "SELECT", "UPDATE", *TASK_LOG, CHECKPOINTS]
    assert "vms.state" in sql[-1] and "vms.tasks" in sql[-1]
    assert "CASE" not in sql[4]  # one VM: a plain UPDATE, not bulk_update's CASE per field
    assert VirtualMachine.objects.get(pk=vm.pk).state == "stopping"


def test_create_appends_the_definition_and_the_start_request_in_one_append(caller_for) -> None:
    caller = caller_for("operator")
    _running(caller)
    with exact_queries(16) as sql:
        accepted = commands.create(caller, name="two", template="linux-small")
    # Before the lock: the template, the default network and the quota definitions (the
    # user's, then its groups', then its groups' team budgets). Under it: the name, the usage
    # (no budget here: none is read), the hosts' capacity (none measured: the VMs committed to
    # them are not summed, vms.capacity), the addresses leased on the network; the head, one INSERT
    # of the three events (definition, lease, start request); the projection: the new VM's row,
    # the usage; the task log's; the checkpoints.
    kinds = [s.split()[0] for s in sql]
    assert kinds == ["SELECT"] * 10 + ["INSERT", "INSERT", "UPDATE", *TASK_LOG, CHECKPOINTS], sql
    assert "vms_groupbudget" in sql[4]  # before the lock
    assert "vms_hostcapacity" in sql[7]  # after the quotas
    vm = VirtualMachine.objects.get(pk=accepted.vm_id)
    assert (vm.state, vm.version, vm.pending_request) == ("starting", 3, accepted.request.event_id)


def test_resize_reads_the_vm_once_under_the_lock(caller_for) -> None:
    caller = caller_for("operator")
    vm = _running(caller)
    with exact_queries(12) as sql:
        commands.resize(caller, vm, vcpus=2)
    # The quota definitions (the user's, its groups') before the lock; under it the VM once,
    # the usage, the hosts' capacity (a running VM's resize up must fit its host), the head and
    # the INSERT; the projection: the VM row, its UPDATE; the task log's; the checkpoints.
    vm_reads = [i for i, s in enumerate(sql) if s.startswith('SELECT "vms_virtualmachine"')]
    assert vm_reads == [2, 7], sql
    assert "vms_hostcapacity" in sql[4]
    assert [s.split()[0] for s in sql[6:]] == ["INSERT", "SELECT", "UPDATE", *TASK_LOG, CHECKPOINTS]
    assert VirtualMachine.objects.get(pk=vm.pk).state == "resizing"


def test_a_create_charged_to_a_team_budget_reads_it_once_under_the_lock(caller_for) -> None:
    from django.contrib.auth.models import Group

    caller = caller_for("operator")
    _running(caller)
    team = Group.objects.create(name="team-q")
    caller.user.groups.add(team)
    commands.set_group_budget(caller_for("admin"), team, {"vms": 5})
    with exact_queries(17) as sql:
        commands.create(caller, name="two", template="linux-small")
    # As above, and under the lock one more: the budget's limits with what its VMs hold.
    budget_reads = [i for i, s in enumerate(sql) if "vms_groupbudget" in s]
    assert budget_reads == [4, 7], sql
    assert sql[6].startswith("SELECT 1 AS") and "vms_usage" in sql[6]  # the user's usage first


def test_an_execs_request_and_outcome_write_the_vm_row_without_reading_it_again(
    caller_for,
) -> None:
    """The events of a guest request (an exec, a file transfer) move only the VM's version: the
    projection writes that with one narrow UPDATE and reads no row."""
    caller = caller_for("operator")
    vm = _running(caller)
    with exact_queries(7) as sql:
        request = commands.request_guest_access(caller, vm, "exec", {"argv": ["true"]})
    # The VM under the lock, its use, the head, the INSERT; the VM's version; the task; the
    # checkpoints.
    kinds = [s.split()[0] for s in sql]
    assert kinds == ["SELECT", "INSERT", "SELECT", "INSERT", "UPDATE", "INSERT", CHECKPOINTS], sql
    assert sql[4].startswith('UPDATE "vms_virtualmachine" SET "version"') and "state" not in sql[4]
    with exact_queries(8) as sql:
        outcome = commands.record_guest_outcome(
            caller, request, "vm.exec_completed", {"exit_code": 0}
        )
    # No outcome yet, the head, the INSERT; the VM's version; the task; the checkpoints; the VM
    # still there, its use.
    kinds = [s.split()[0] for s in sql]
    assert kinds == [
        "SELECT",
        "SELECT",
        "INSERT",
        "UPDATE",
        "UPDATE",
        CHECKPOINTS,
        "SELECT",
        "INSERT",
    ]
    assert not any(
        s.startswith('SELECT "vms_virtualmachine"."id", "vms_virtualmachine"."name"') for s in sql
    )
    fresh = VirtualMachine.objects.get(pk=vm.pk)
    assert (fresh.state, fresh.version) == ("running", outcome.version)
    assert outcome.version == request.version + 1
