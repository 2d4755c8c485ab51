"""Host capacity and overcommit (docs/resources.md, "Host capacity"): the heartbeat measures its
host; a create, a start or a resize up past the overcommitted capacity is refused with the
numbers, before anything is appended; readers of all VMs see each host's capacity."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from audit.models import Event
from vms import capacity, commands, heartbeat, policy, runtime
from vms.capacity import CapacityExceeded
from vms.models import HostCapacity, VirtualMachine, WorkerHeartbeat

pytestmark = pytest.mark.django_db

ROOMY = {"vms": 50, "vcpus": 100, "memory_mib": 1 << 20, "disk_mib": 1 << 24, "snapshots": 50}


@pytest.fixture(autouse=True)
def _overcommit(settings) -> None:
    # The quotas never bind here: what is refused, the capacity refuses.
    settings.SANDBOX_DEFAULT_QUOTA = dict(ROOMY)
    settings.SANDBOX_MAX_VMS = 1000
    settings.SANDBOX_CPU_OVERCOMMIT = 4.0
    settings.SANDBOX_MEMORY_OVERCOMMIT = 1.0
    settings.SANDBOX_HOST_RESERVED_MEMORY_MIB = 512


def _host(name: str = "h1", cpus: int = 1, memory_mib: int = 1024, age_s: float = 0) -> None:
    """A host measured ``age_s`` ago: by default room for 4 vCPUs and 512 MiB."""
    HostCapacity.objects.update_or_create(
        host=name,
        defaults={
            "cpus": cpus,
            "memory_mib": memory_mib,
            "measured_at": timezone.now() - timedelta(seconds=age_s),
        },
    )


def _running_on(caller, host: str, name: str, memory_mib: int = 256) -> VirtualMachine:
    accepted = commands.create(caller, name=name, template="linux-small", memory_mib=memory_mib)
    commands.record_outcome(accepted.request, "vm.started", {"host": host, "hypervisor": "qemu"})
    return policy.visible_vms(caller).get(pk=accepted.vm_id)


def test_the_heartbeat_records_its_hosts_capacity() -> None:
    now = timezone.now()
    WorkerHeartbeat.objects.create(queue="q", host="x", pid=1, started_at=now, sent_at=now)
    heartbeat.beat("q", now.isoformat())
    row = HostCapacity.objects.get(host=runtime.host_name())
    meminfo = Path("/proc/meminfo").read_text().split("\n")
    total_kb = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1])
    assert (row.cpus, row.memory_mib) == (os.cpu_count(), total_kb // 1024)
    assert row.available_mib is not None and 0 < row.available_mib <= row.memory_mib
    assert row.load1 is not None and row.load1 >= 0
    assert row.measured_at >= now
    assert WorkerHeartbeat.objects.get(queue="q").beat_at is not None  # the beat still counts


def test_measure_reads_pressure_where_present_and_refuses_nonsense(tmp_path) -> None:
    (tmp_path / "meminfo").write_text("MemTotal:  2097152 kB\nMemAvailable: 1048576 kB\n")
    (tmp_path / "loadavg").write_text("0.50 0.40 0.30 1/100 42\n")
    m = capacity.measure(tmp_path)
    assert (m["memory_mib"], m["available_mib"], m["load1"]) == (2048, 1024, 0.5)
    assert (m["cpu_pressure"], m["memory_pressure"]) == (None, None)  # no PSI on this kernel
    (tmp_path / "pressure").mkdir()
    (tmp_path / "pressure" / "cpu").write_text("some avg10=12.50 avg60=1.00 avg300=0 total=9\n")
    (tmp_path / "pressure" / "memory").write_text("some avg10=nan avg60=0 avg300=0 total=0\n")
    m = capacity.measure(tmp_path)
    assert (m["cpu_pressure"], m["memory_pressure"]) == (12.5, None)
    (tmp_path / "meminfo").write_text("MemTotal: lots\n")
    with pytest.raises(RuntimeError, match="MemTotal"):
        capacity.measure(tmp_path)


def test_a_create_past_the_clusters_memory_is_refused_and_appends_nothing(caller_for) -> None:
    caller = caller_for("operator")
    _host("h1")  # 1024 MiB less 512 reserved: 512 MiB
    _running_on(caller, "h1", "a", memory_mib=256)
    before = Event.objects.count()
    with pytest.raises(CapacityExceeded) as refused:
        commands.create(caller, name="b", template="linux-small", memory_mib=512)
    assert Event.objects.count() == before
    assert not VirtualMachine.objects.filter(name="b").exists()
    body = refused.value.as_dict()
    assert body | {"detail": ""} == {
        "detail": "",
        "quota": "memory_mib",
        "scope": "host",
        "host": None,
        "resource": "memory_mib",
        "limit": 512,
        "capacity": 512,
        "used": 256,
        "committed": 256,
        "requested": 512,
    }
    assert "the cluster has no room: memory_mib 256 committed + 512 requested" in body["detail"]


def test_the_api_refuses_with_the_reason(caller_for, make_user) -> None:
    _host("h1", cpus=1, memory_mib=768)  # 256 MiB
    client = APIClient()
    client.force_authenticate(make_user("operator"))
    before = Event.objects.count()
    answer = client.post(
        "/api/v1/vms/", {"name": "x", "template": "linux-small", "memory_mib": 512}
    )
    assert answer.status_code == 403, answer.content
    assert (answer.json()["scope"], answer.json()["capacity"]) == ("host", 256)
    assert Event.objects.count() == before


def test_exactly_at_capacity_is_accepted(caller_for) -> None:
    caller = caller_for("operator")
    _host("h1")
    _running_on(caller, "h1", "a", memory_mib=256)
    commands.create(caller, name="b", template="linux-small", memory_mib=256)  # 512 of 512
    with pytest.raises(CapacityExceeded):  # and the smallest VM more is not
        commands.create(caller, name="c", template="linux-small", memory_mib=128)


def test_the_overcommit_settings_change_the_answer(caller_for, settings) -> None:
    caller = caller_for("operator")
    _host("h1", cpus=1)  # 4 vCPUs at 4.0 per CPU
    with pytest.raises(CapacityExceeded) as refused:
        commands.create(caller, name="a", template="linux-small", vcpus=5, memory_mib=128)
    assert (refused.value.quota, refused.value.limit) == ("vcpus", 4)
    settings.SANDBOX_CPU_OVERCOMMIT = 8.0
    commands.create(caller, name="a", template="linux-small", vcpus=5, memory_mib=128)
    with pytest.raises(CapacityExceeded):
        commands.create(caller, name="b", template="linux-small", memory_mib=600)
    settings.SANDBOX_MEMORY_OVERCOMMIT = 2.0  # (1024 - 512) x 2: 1024 MiB
    commands.create(caller, name="b", template="linux-small", memory_mib=600)


def test_hosts_sum_and_stale_or_no_hosts_refuse_nothing(caller_for) -> None:
    caller = caller_for("operator")
    commands.create(caller, name="a", template="linux-small", memory_mib=4096)  # none measured
    _host("h1", age_s=10_000)  # stale: its worker is gone
    commands.create(caller, name="b", template="linux-small", memory_mib=4096)
    _host("h1")
    _host("h2")
    with pytest.raises(CapacityExceeded):  # a and b are starting: they count, unplaced
        commands.create(caller, name="c", template="linux-small", memory_mib=128)


def test_a_start_must_fit_its_host(caller_for) -> None:
    caller = caller_for("operator")
    _host("h1")
    _host("h2", memory_mib=4096)
    stopped = _running_on(caller, "h1", "a", memory_mib=256)
    commands.record_outcome(commands.stop(caller, stopped).request, "vm.stopped", {})
    _running_on(caller, "h1", "b", memory_mib=384)  # h1 now holds 384 of 512
    stopped = policy.visible_vms(caller).get(pk=stopped.pk)
    before = Event.objects.count()
    with pytest.raises(CapacityExceeded) as refused:
        commands.start(caller, stopped)
    assert (refused.value.host, refused.value.used, refused.value.requested) == ("h1", 384, 256)
    assert Event.objects.count() == before


def test_a_resize_up_must_fit_its_host(caller_for) -> None:
    caller = caller_for("operator")
    _host("h1")
    vm = _running_on(caller, "h1", "a", memory_mib=256)
    with pytest.raises(CapacityExceeded) as refused:
        commands.resize(caller, vm, memory_mib=1024)
    assert (refused.value.host, refused.value.requested) == ("h1", 768)
    commands.resize(caller, vm, memory_mib=512)  # exactly the host's 512


@pytest.mark.parametrize("role,status", [("operator", 403), ("viewer", 200), ("admin", 200)])
def test_the_hosts_api_is_for_readers_of_all_vms(role, status, caller_for, token_client) -> None:
    _host("h1", cpus=2, memory_mib=2560)
    _running_on(caller_for("operator"), "h1", "a", memory_mib=512)
    answer = token_client(caller_for(role).user).get("/api/v1/hosts/")
    assert answer.status_code == status, answer.content
    if status == 200:
        (h1,) = answer.json()["hosts"]
        assert h1["name"] == "h1" and h1["fresh"] is True
        assert h1["capacity"] == {"vcpus": 8, "memory_mib": 2048}
        assert h1["committed"] == {"vcpus": 1, "memory_mib": 512}
        assert h1["ratios"] == {"vcpus_per_cpu": 0.5, "memory_committed": 0.2}
        assert answer.json()["settings"]["cpu_overcommit"] == 4.0


def test_the_hosts_api_needs_a_login() -> None:
    assert APIClient().get("/api/v1/hosts/").status_code in (401, 403)


def test_the_hosts_page_shows_capacity(caller_for, client) -> None:
    _host("h1", cpus=2, memory_mib=2560)
    _running_on(caller_for("operator"), "h1", "a", memory_mib=512)
    client.force_login(caller_for("viewer").user)
    page = client.get("/vms/hosts/").content.decode()
    assert "1 / 8 vCPUs (0.5 per CPU) · 512 / 2048 MiB" in page


def test_the_create_form_says_the_hosts_have_no_room(caller_for, client) -> None:
    _host("h1")  # 512 MiB
    client.force_login(caller_for("operator").user)
    form = {"name": "big", "template": "linux-small", "memory_mib": 1024, "start": ""}
    refused = client.post("/vms/new/", form).content.decode()
    assert "No room on the hosts: the cluster has no room: memory_mib 0 committed" in refused
    assert not VirtualMachine.objects.filter(name="big").exists()


def test_a_failed_first_start_holds_nothing_but_a_failed_placed_vm_does(caller_for) -> None:
    caller = caller_for("operator")
    _host("h1")  # 512 MiB
    never = commands.create(caller, name="a", template="linux-small", memory_mib=512)
    commands.record_outcome(never.request, "vm.start_failed", {"error": "no kernel"})
    assert VirtualMachine.objects.get(pk=never.vm_id).host == ""
    placed = _running_on(caller, "h1", "b", memory_mib=512)  # fits: "a" holds nothing
    commands.record_outcome(commands.stop(caller, placed).request, "vm.stopped", {})
    placed = policy.visible_vms(caller).get(pk=placed.pk)
    request = commands.start(caller, placed).request  # fits: a stopped VM holds nothing
    commands.record_outcome(request, "vm.start_failed", {"error": "agent silent"})
    placed = VirtualMachine.objects.get(pk=placed.pk)
    assert (placed.state, placed.host) == ("failed", "h1")
    with pytest.raises(CapacityExceeded):  # its VMM may still run on h1
        commands.create(caller, name="c", template="linux-small", memory_mib=128)
