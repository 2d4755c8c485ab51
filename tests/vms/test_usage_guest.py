"""Usage history on a real guest with a real worker: the worker's ticks sample the running VM
every 10 s (through the task guard), the QEMU counters give disk rates, and the API answers the
samples to the owner."""

from __future__ import annotations

import time

import pytest
from rest_framework.test import APIClient

from tests.vms.conftest import wait_for
from vms.models import UsageSample

pytestmark = [pytest.mark.guest, pytest.mark.django_db(transaction=True)]


def test_the_worker_samples_a_running_guest(make_user, issue_token, worker, vm_dirs) -> None:
    user = make_user("operator", "usage-guest")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {issue_token(user)}")
    created = client.post("/api/v1/vms/", {"name": "usage-1", "template": "linux-small"})
    assert created.status_code == 202, created.json()
    vm_id = created.json()["vm"]["id"]

    def running() -> bool:
        vm = client.get(f"/api/v1/vms/{vm_id}/").json()
        assert vm["state"] != "failed", vm["last_error"]
        return vm["state"] == "running" and not vm["pending_type"]

    wait_for(running, 240, "the VM to run", interval=0.5)
    # Disk reads in the guest between samples (the page cache dropped, so they reach the disk).
    run = client.post(
        f"/api/v1/vms/{vm_id}/exec/",
        {
            "argv": [
                "sh",
                "-c",
                "for i in 1 2 3 4 5 6; do echo 3 > /proc/sys/vm/drop_caches; "
                "cat /bin/* > /dev/null 2>&1; sleep 5; done",
            ],
            "timeout": 60,
        },
        format="json",
    )
    assert run.status_code == 200, run.json()

    def rated() -> list[UsageSample]:
        rows = list(UsageSample.objects.filter(vm_id=vm_id).order_by("ts"))
        return rows if sum(1 for r in rows if r.cpu is not None) >= 2 else []

    rows = wait_for(rated, 90, "two samples with rates", interval=1)
    assert all(b.ts - a.ts >= 10 for a, b in zip(rows, rows[1:], strict=False))
    with_rates = [r for r in rows if r.cpu is not None]
    assert all(r.mem is not None and r.mem > 50 * 2**20 for r in rows)  # a booted QEMU's RSS
    assert all(r.disk_read is not None for r in with_rates), [r.disk_read for r in rows]
    assert any(r.disk_read > 0 for r in with_rates), [r.disk_read for r in with_rates]

    answer = client.get(
        f"/api/v1/vms/{vm_id}/usage/", {"from": int(time.time()) - 600, "step": "10s"}
    )
    assert answer.status_code == 200, answer.json()
    answered = {p["ts"] for p in answer.json()["points"]}
    # Every sample seen above, and nothing the table does not hold (one more may have come).
    assert {r.ts for r in rows} <= answered
    assert answered <= {r.ts for r in UsageSample.objects.filter(vm_id=vm_id)}

    destroy = client.delete(f"/api/v1/vms/{vm_id}/")
    assert destroy.status_code == 202
    wait_for(
        lambda: client.get(f"/api/v1/vms/{vm_id}/").json()["state"] == "destroyed",
        120,
        "the VM to be destroyed",
        interval=0.5,
    )
