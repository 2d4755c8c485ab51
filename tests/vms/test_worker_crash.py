"""A worker killed with SIGKILL in the middle of a boot: after it restarts, the VM ends running
or failed with a reason, never stuck, and no VMM process is left without a live VM."""

from __future__ import annotations

import os

import pytest
from rest_framework.test import APIClient

from tests.vms.conftest import Worker, wait_for
from vms.hypervisors import reconcile as scanner
from vms.models import RequestOutcome, VirtualMachine
from vms.runtime import runtime_dir

pytestmark = [pytest.mark.guest, pytest.mark.django_db(transaction=True)]


def vmm_alive(vm_id) -> int | None:
    pid = runtime_dir(vm_id).pid()
    if pid and os.path.exists(f"/proc/{pid}"):
        return pid
    return None


def test_worker_killed_mid_boot(
    make_user, issue_token, worker, worker_env, vm_dirs, tmp_path
) -> None:
    user = make_user("operator", "crash")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {issue_token(user)}")
    # UEFI guests cold-boot in ~15 s: a wide window to kill the worker in.
    created = client.post(
        "/api/v1/vms/", {"name": "victim", "template": "linux-uefi"}, format="json"
    )
    assert created.status_code == 202, created.json()
    vm_id = created.json()["vm"]["id"]
    request_id = created.json()["request"]["event_id"]

    wait_for(lambda: vmm_alive(vm_id), 120, "the worker to start the VMM")
    assert not RequestOutcome.objects.filter(request_event_id=request_id).exists(), (
        "boot finished too early"
    )
    worker.kill9()

    # The VMM outlives the worker (its own session); the VM is mid-request.
    vm = VirtualMachine.objects.get(pk=vm_id)
    assert vm.state == "starting" and vm.pending_request == request_id

    second = Worker(worker_env, tmp_path / "worker2.log")
    second.start()
    try:

        def settled() -> VirtualMachine | None:
            v = VirtualMachine.objects.get(pk=vm_id)
            return v if not v.pending_request else None

        vm = wait_for(settled, 180, "the restarted worker to settle the request")
        assert vm.state in ("running", "failed")
        if vm.state == "failed":
            assert vm.last_error
            assert vmm_alive(vm_id) is None
        else:
            assert vmm_alive(vm_id)
        outcome = RequestOutcome.objects.get(request_event_id=request_id)
        assert outcome.outcome_type in ("vm.started", "vm.start_failed")

        report = scanner.scan(vm_dirs["run"], known_ids=[vm.pk.hex[:12]])
        assert report.orphans == [], report.orphans

        destroyed = client.delete(f"/api/v1/vms/{vm_id}/")
        assert destroyed.status_code == 202
        wait_for(lambda: VirtualMachine.objects.get(pk=vm_id).state == "destroyed", 120, "destroy")
        assert vmm_alive(vm_id) is None
    finally:
        second.stop()
