"""Right-sizing from the usage history: a VM that never used half its memory gets a smaller
memory, one that is always CPU-bound one more vCPU, one with idle vCPUs fewer; too little
history gives no advice; the API and the VM page show it to those who see the VM, and the page's
button applies it with a resize."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.test import Client

from accounts.caller import Caller
from vms import commands, rightsizing
from vms.models import UsageHour, UsageRollupState, VirtualMachine

pytestmark = pytest.mark.django_db

MIB = 2**20


def _hours(vm: VirtualMachine, n: int, *, cpu: float, cpu_max: float, mem_max_mib: float) -> None:
    """``n`` hours of history up to now in the hour tier (folded that far)."""
    now = int(time.time()) // 3600 * 3600
    UsageHour.objects.bulk_create(
        UsageHour(
            vm_id=vm.pk,
            ts=ts,
            cpu_sum=360 * cpu,
            cpu_count=360,
            cpu_max=cpu_max,
            mem_sum=360 * mem_max_mib * MIB * 0.8,
            mem_count=360,
            mem_max=mem_max_mib * MIB,
        )  # fmt: skip
        for ts in range(now - n * 3600, now, 3600)
    )
    for tier in ("1m", "1h"):
        UsageRollupState.objects.update_or_create(tier=tier, defaults={"until": now})


def _vm(owner: Any, name: str, **shape: int) -> VirtualMachine:
    accepted = commands.create(
        Caller.for_user(owner), name=name, template="linux-small", start_now=False, **shape
    )
    return VirtualMachine.objects.get(pk=accepted.vm_id)


def test_memory_never_used_gets_a_smaller_size(make_user) -> None:
    vm = _vm(make_user("operator", "opal"), "roomy", memory_mib=1024)
    _hours(vm, 24, cpu=5.0, cpu_max=30.0, mem_max_mib=180.0)
    advice = rightsizing.recommend(vm)
    assert advice["hours_of_history"] == 24
    [rec] = advice["recommendations"]
    assert (rec["resource"], rec["current"], rec["recommended"]) == ("memory_mib", 1024, 256)
    assert "180 MiB" in rec["why"]


def test_a_cpu_bound_vm_gets_a_vcpu_and_idle_vcpus_are_given_back(make_user) -> None:
    owner = make_user("operator", "opal")
    busy = _vm(owner, "busy", vcpus=2, memory_mib=256)
    _hours(busy, 12, cpu=195.0, cpu_max=200.0, mem_max_mib=240.0)
    [rec] = rightsizing.recommend(busy)["recommendations"]
    assert (rec["resource"], rec["recommended"]) == ("vcpus", 3) and "CPU-bound" in rec["why"]
    idle = _vm(owner, "idle", vcpus=4, memory_mib=256)
    _hours(idle, 12, cpu=3.0, cpu_max=60.0, mem_max_mib=240.0)
    [rec] = rightsizing.recommend(idle)["recommendations"]
    assert (rec["resource"], rec["current"], rec["recommended"]) == ("vcpus", 4, 1)


def test_too_little_history_or_a_good_fit_gives_no_advice(make_user) -> None:
    owner = make_user("operator", "opal")
    young = _vm(owner, "young", memory_mib=1024)
    _hours(young, 3, cpu=5.0, cpu_max=10.0, mem_max_mib=100.0)
    advice = rightsizing.recommend(young)
    assert advice["recommendations"] == [] and "6 hours" in advice["note"]
    fit = _vm(owner, "fit", memory_mib=256)
    _hours(fit, 10, cpu=40.0, cpu_max=80.0, mem_max_mib=200.0)
    assert rightsizing.recommend(fit)["recommendations"] == []


def test_the_api_and_the_page_show_it_and_the_page_applies_it(make_user) -> None:
    opal, otto = make_user("operator", "opal"), make_user("operator", "otto")
    vm = _vm(opal, "roomy", memory_mib=1024)
    _hours(vm, 24, cpu=5.0, cpu_max=30.0, mem_max_mib=180.0)
    client = Client()
    client.force_login(opal)
    body = client.get(f"/api/v1/vms/{vm.pk}/rightsizing/").json()
    assert body["recommendations"][0]["recommended"] == 256
    page = client.get(f"/vms/{vm.pk}/").content.decode()
    assert "Memory: 1024 → 256 MiB" in page and 'id="apply-rightsizing"' in page
    response = client.post(f"/vms/{vm.pk}/resize/", {"memory_mib": "256"})
    assert response.status_code == 302
    vm.refresh_from_db()
    assert vm.state == "resizing"  # the resize the owner applied, as any resize
    other = Client()
    other.force_login(otto)
    assert other.get(f"/api/v1/vms/{vm.pk}/rightsizing/").status_code == 404
