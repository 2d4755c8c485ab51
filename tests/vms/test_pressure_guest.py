"""On real guests: under induced host memory pressure the pressure loop balloons the
low-priority guest (running a memory hog) and leaves its high-priority neighbour alone; the
events say why, with the readings and thresholds; once the pressure is gone the memory returns.

The pressure is induced through the product's own settings: the memory threshold is set above
this host's total memory, so the real MemAvailable reading (read from /proc by the product code)
counts as pressure; then set to 0, so the same real reading counts as calm. Nothing on this
shared machine is driven short of memory."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.utils import timezone
from django.utils.module_loading import import_string

from audit.models import Event
from tests.vms.conftest import wait_for
from vms import commands, guest, pressure, runtime, worker
from vms.models import VirtualMachine

pytestmark = [pytest.mark.guest, pytest.mark.django_db(transaction=True)]

HOG = "import time; b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(600)"


def _mem_total_kib(owner: Any, vm: VirtualMachine) -> int:
    out = guest.run_exec(owner, vm, ["cat", "/proc/meminfo"], timeout=30)
    for line in out.stdout.decode().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    raise AssertionError(out.stdout)


def _rss_mib(vm: VirtualMachine) -> int:
    pid = runtime.runtime_dir(vm.pk).pid()
    for line in open(f"/proc/{pid}/status").read().splitlines():  # noqa: PTH123
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return -1


def test_a_hog_in_a_low_priority_guest_is_ballooned_and_its_high_neighbour_is_not(
    caller_for: Any, vm_dirs: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import django_q.tasks

    from vms import images

    image = images.ensure_built()
    monkeypatch.setenv("SANDBOX_IMAGE_DIR", str(image.directory))
    ran: list[Any] = []
    monkeypatch.setattr(
        django_q.tasks, "async_task", lambda func, **kw: ran.append(import_string(func)())
    )
    # 256 MiB guests keep 160 MiB while ballooned: room for the hog (at half, the guest's own
    # OOM killer took it).
    settings.SANDBOX_PRESSURE_BALLOON_FRACTION = 0.375
    settings.SANDBOX_PRESSURE_HOLD_S = 0.0
    settings.SANDBOX_PRESSURE_ESCALATE_S = 3600.0
    settings.SANDBOX_PRESSURE_MEM_PSI = settings.SANDBOX_PRESSURE_RELEASE_PSI = 100.0
    # The CPU side out of the way (never over 100 %): this test is about memory.
    settings.SANDBOX_PRESSURE_CPU_PSI = settings.SANDBOX_PRESSURE_RELEASE_CPU_PSI = 100.0

    def look() -> None:
        monkeypatch.setattr(pressure, "_next_look", 0.0)
        pressure.tick(timezone.now())

    owner = caller_for("operator")
    low = commands.create(owner, name="pressure-low", template="linux-small", priority="low")
    high = commands.create(owner, name="pressure-high", template="linux-small", priority="high")
    try:
        assert worker.handle(low.request.event_id) == "vm.started"
        assert worker.handle(high.request.event_id) == "vm.started"
        low_vm = VirtualMachine.objects.get(pk=low.vm_id)
        high_vm = VirtualMachine.objects.get(pk=high.vm_id)
        assert (low_vm.priority, high_vm.priority) == ("low", "high")
        hv = runtime.hypervisor()
        low_rt, high_rt = runtime.runtime_dir(low.vm_id), runtime.runtime_dir(high.vm_id)
        assert hv.balloon_mib(low_rt) == hv.balloon_mib(high_rt) == 256

        # An earlier job that touched 96 MiB and ended: its pages stay resident in QEMU (no free
        # page reporting) until a balloon takes them.
        job = "b = bytearray(96 << 20); b[::4096] = b'x' * len(b[::4096])"
        assert guest.run_exec(owner, low_vm, ["python3", "-c", job], timeout=60).exit_code == 0
        # The hog: 64 MiB touched in the low guest, left running.
        started = guest.run_exec(
            owner,
            low_vm,
            ["sh", "-c", f'python3 -c "{HOG}" </dev/null >/dev/null 2>&1 & echo $!'],
            timeout=30,
        )
        hog_pid = started.stdout.decode().strip()
        assert hog_pid.isdigit(), started
        wait_for(
            lambda: (
                guest.run_exec(owner, low_vm, ["cat", f"/proc/{hog_pid}/status"]).exit_code == 0
            ),
            30,
            "the hog to run",
        )
        total_before = _mem_total_kib(owner, low_vm)
        rss_before = (_rss_mib(low_vm), _rss_mib(high_vm))

        # Calm (the real reading is above 0): nothing to do, nothing enqueued.
        settings.SANDBOX_PRESSURE_MEM_AVAILABLE_MIB = 0
        settings.SANDBOX_PRESSURE_RELEASE_AVAILABLE_MIB = 0
        look()
        assert ran == []

        # Induced pressure: the threshold above the host's total memory.
        host_total = pressure.read().memory_mib
        assert host_total
        settings.SANDBOX_PRESSURE_MEM_AVAILABLE_MIB = host_total + 1
        settings.SANDBOX_PRESSURE_RELEASE_AVAILABLE_MIB = host_total + 1
        look()
        assert ran == [1]
        ballooned = Event.objects.get(type="vm.ballooned")
        assert ballooned.aggregate_id == str(low.vm_id)
        data = ballooned.payload
        assert data["action"] == "balloon" and data["priority"] == "low"
        assert "memory available" in data["reason"] and f"< {host_total + 1} MiB" in data["reason"]
        assert 0 < data["mem_available_mib"] <= host_total
        assert data["threshold"]["mem_available_mib"] == host_total + 1
        assert (data["before_mib"], data["target_mib"]) == (256, 160)
        assert (ballooned.actor_type, ballooned.actor_name) == ("system", "pressure")
        assert not Event.objects.filter(aggregate_id=str(high.vm_id), type="vm.ballooned")
        low_vm.refresh_from_db()
        assert (low_vm.state, low_vm.balloon_target_mib) == ("running", 160)

        # The guest gives the memory up: its balloon inflates, its MemTotal drops; the hog lives.
        wait_for(lambda: hv.balloon_mib(low_rt) <= 176, 60, "the balloon to inflate", 0.5)
        total_ballooned = _mem_total_kib(owner, low_vm)
        assert total_ballooned <= total_before - 80 * 1024, (total_before, total_ballooned)
        alive = guest.run_exec(owner, low_vm, ["cat", f"/proc/{hog_pid}/status"])
        if alive.exit_code != 0:
            dmesg = guest.run_exec(owner, low_vm, ["dmesg"]).stdout.decode()[-1500:]
            raise AssertionError(f"the hog died: {dmesg}")
        assert hv.balloon_mib(high_rt) == 256  # the neighbour keeps all of its memory
        rss_after = (_rss_mib(low_vm), _rss_mib(high_vm))
        print(  # noqa: T201 - figures for docs/resources.md
            f"low guest MemTotal {total_before} -> {total_ballooned} KiB, "
            f"QEMU RSS (low, high) {rss_before} -> {rss_after} MiB"
        )
        # The host got memory back: what the ended job had touched left the low VMM's RSS.
        assert rss_after[0] <= rss_before[0] - 32, (rss_before, rss_after)

        # Still under pressure: the low balloon is already there, high is never touched.
        look()
        assert Event.objects.filter(type="vm.ballooned").count() == 1

        # The pressure gone: the memory comes back, and the event says so.
        settings.SANDBOX_PRESSURE_MEM_AVAILABLE_MIB = 0
        settings.SANDBOX_PRESSURE_RELEASE_AVAILABLE_MIB = 0
        look()
        released = Event.objects.get(type="vm.balloon_released")
        assert released.aggregate_id == str(low.vm_id)
        assert released.payload["action"] == "release"
        assert released.payload["target_mib"] == 256
        assert released.payload["before_mib"] <= 176
        assert "memory available" in released.payload["reason"]
        wait_for(lambda: hv.balloon_mib(low_rt) == 256, 60, "the balloon to deflate", 0.5)
        assert _mem_total_kib(owner, low_vm) == total_before
        low_vm.refresh_from_db()
        assert (low_vm.state, low_vm.balloon_target_mib) == ("running", None)
        look()  # nothing left to give back
        assert Event.objects.filter(type="vm.balloon_released").count() == 1
    finally:
        for accepted in (low, high):
            vm = VirtualMachine.objects.get(pk=accepted.vm_id)
            if vm.state != "destroyed":
                destroy = commands.destroy(owner, vm)
                worker.handle(destroy.request.event_id)


def _cgroup_weight(vm_id: Any) -> int | None:
    from vms.hypervisors import jail

    record = json.loads((runtime.runtime_dir(vm_id).root / "vm.json").read_text())["jail"]
    return jail.Cgroups().cpu_weight(runtime.jail_config().cgroup_parent, record["name"])


def test_under_cpu_pressure_the_low_guest_gets_a_lower_cpu_weight_and_it_comes_back(
    caller_for: Any, vm_dirs: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import django_q.tasks

    from vms import images

    if not runtime.jail_config().enabled:
        pytest.skip("VMMs are not jailed here (not root): they have no cgroup of their own")
    image = images.ensure_built()
    monkeypatch.setenv("SANDBOX_IMAGE_DIR", str(image.directory))
    ran: list[Any] = []
    monkeypatch.setattr(
        django_q.tasks, "async_task", lambda func, **kw: ran.append(import_string(func)())
    )
    settings.SANDBOX_PRESSURE_HOLD_S = 0.0
    settings.SANDBOX_PRESSURE_MEM_AVAILABLE_MIB = (
        settings.SANDBOX_PRESSURE_RELEASE_AVAILABLE_MIB
    ) = 0
    settings.SANDBOX_PRESSURE_CPU_WEIGHT = 10

    def look() -> None:
        monkeypatch.setattr(pressure, "_next_look", 0.0)
        pressure.tick(timezone.now())

    owner = caller_for("operator")
    low = commands.create(owner, name="cpu-low", template="linux-small", priority="low")
    high = commands.create(owner, name="cpu-high", template="linux-small", priority="high")
    try:
        assert worker.handle(low.request.event_id) == "vm.started"
        assert worker.handle(high.request.event_id) == "vm.started"
        assert _cgroup_weight(low.vm_id) == _cgroup_weight(high.vm_id) == 100
        # Real CPU pressure: both guests spin (TCG: a host core each, on a 2-core host).
        for accepted in (low, high):
            vm = VirtualMachine.objects.get(pk=accepted.vm_id)
            spin = "while :; do :; done </dev/null >/dev/null 2>&1 &"
            assert guest.run_exec(owner, vm, ["sh", "-c", spin], timeout=30).exit_code == 0
        wait_for(lambda: (pressure.read().cpu_psi or 0) >= 1.0, 60, "host CPU pressure", 1)
        settings.SANDBOX_PRESSURE_CPU_PSI = 0.5
        settings.SANDBOX_PRESSURE_RELEASE_CPU_PSI = 0.0
        look()
        lowered = Event.objects.get(type="vm.cpu_lowered")
        assert lowered.aggregate_id == str(low.vm_id)
        assert lowered.payload["action"] == "cpu_lower"
        assert lowered.payload["cpu_psi_some_avg10"] > 0.5
        assert "CPU PSI some avg10" in lowered.payload["reason"]
        assert (lowered.payload["before"], lowered.payload["weight"]) == (100, 10)
        assert lowered.payload["threshold"]["cpu_psi_some_avg10"] == 0.5
        assert _cgroup_weight(low.vm_id) == 10
        assert _cgroup_weight(high.vm_id) == 100
        assert not Event.objects.filter(type="vm.ballooned").exists()

        # The pressure gone (the release threshold at the top of the scale): the weight is back.
        settings.SANDBOX_PRESSURE_CPU_PSI = settings.SANDBOX_PRESSURE_RELEASE_CPU_PSI = 100.0
        look()
        restored = Event.objects.get(type="vm.cpu_restored")
        assert restored.aggregate_id == str(low.vm_id)
        assert (restored.payload["before"], restored.payload["weight"]) == (10, None)
        assert _cgroup_weight(low.vm_id) == 100
        vm = VirtualMachine.objects.get(pk=low.vm_id)
        assert (vm.state, vm.cpu_weight) == ("running", None)
    finally:
        for accepted in (low, high):
            vm = VirtualMachine.objects.get(pk=accepted.vm_id)
            if vm.state != "destroyed":
                destroy = commands.destroy(owner, vm)
                worker.handle(destroy.request.event_id)


def test_a_guest_snapshotted_while_ballooned_is_restored_with_all_its_memory(
    caller_for: Any, vm_dirs: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The balloon's target is part of the saved guest (QEMU migrates virtio-balloon's state):
    the restore gives it back its full memory, as its read model (not ballooned) says."""
    import django_q.tasks

    from vms import images
    from vms.models import Snapshot

    image = images.ensure_built()
    monkeypatch.setenv("SANDBOX_IMAGE_DIR", str(image.directory))
    monkeypatch.setattr(django_q.tasks, "async_task", lambda func, **kw: import_string(func)())
    settings.SANDBOX_PRESSURE_BALLOON_FRACTION = 0.375
    settings.SANDBOX_PRESSURE_MEM_PSI = settings.SANDBOX_PRESSURE_RELEASE_PSI = 100.0
    settings.SANDBOX_PRESSURE_CPU_PSI = settings.SANDBOX_PRESSURE_RELEASE_CPU_PSI = 100.0
    owner = caller_for("operator")
    low = commands.create(owner, name="saved-ballooned", template="linux-small", priority="low")
    try:
        assert worker.handle(low.request.event_id) == "vm.started"
        vm = VirtualMachine.objects.get(pk=low.vm_id)
        hv, rt = runtime.hypervisor(), runtime.runtime_dir(low.vm_id)
        assert hv.balloon_mib(rt) == vm.memory_mib == 256
        total_before = _mem_total_kib(owner, vm)
        # Induced pressure (the threshold above the host's total memory): ballooned to 160 MiB.
        host_total = pressure.read().memory_mib
        assert host_total
        settings.SANDBOX_PRESSURE_MEM_AVAILABLE_MIB = host_total + 1
        settings.SANDBOX_PRESSURE_RELEASE_AVAILABLE_MIB = host_total + 1
        monkeypatch.setattr(pressure, "_next_look", 0.0)
        pressure.tick(timezone.now())
        wait_for(lambda: hv.balloon_mib(rt) <= 176, 60, "the balloon to inflate", 0.5)
        # Snapshot it while ballooned; no more pressure passes from here on.
        settings.SANDBOX_PRESSURE_ENABLED = False
        taken = commands.snapshot(owner, VirtualMachine.objects.get(pk=vm.pk), name="ballooned")
        assert worker.handle(taken.request.event_id) == "vm.snapshotted"
        snap = Snapshot.objects.get(pk=taken.snapshot.pk)
        assert snap.state == "ready", snap.last_error

        restore = commands.restore(owner, VirtualMachine.objects.get(pk=vm.pk), snap)
        assert worker.handle(restore.request.event_id) == "vm.restored"
        restored = Event.objects.get(causation_id=restore.request.event_id, type="vm.restored")
        assert restored.payload["balloon_saved_mib"] <= 176  # it came back ballooned ...
        # ... and gets all its memory back (QMP query-balloon, then the guest's own MemTotal).
        wait_for(lambda: hv.balloon_mib(rt) == 256, 60, "the balloon to deflate", 0.5)
        vm = VirtualMachine.objects.get(pk=vm.pk)
        assert _mem_total_kib(owner, vm) == total_before
        assert (vm.state, vm.balloon_target_mib, vm.ballooned_at) == ("running", None, None)
    finally:
        vm = VirtualMachine.objects.get(pk=low.vm_id)
        if vm.state != "destroyed":
            destroy = commands.destroy(owner, vm)
            worker.handle(destroy.request.event_id)
