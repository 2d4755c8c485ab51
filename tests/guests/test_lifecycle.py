"""Driving real QEMU guests through the Hypervisor protocol: boot, pause, snapshot, restore,
crash detection and clean-up."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vms.agent.client import AgentTimeout
from vms.hypervisors import process, reconcile
from vms.hypervisors.base import (
    DiskSpec,
    HypervisorError,
    NotSupported,
    RuntimeDir,
    SnapshotFiles,
    VMSpec,
    VMState,
)
from vms.hypervisors.qemu import QemuHypervisor

from .conftest import HELLO_TIMEOUT, Guest, connect_agent

pytestmark = pytest.mark.guest


def _qemu_pids_for(runtime: RuntimeDir) -> list[int]:
    marker = str(runtime.root) + "/"
    return [
        p.pid
        for p in process.iter_processes(("qemu-system-x86_64",))
        if any(marker in a for a in p.argv)
    ]


def test_cold_boot_reaches_agent_hello(start_guest: Callable[..., Guest]) -> None:
    started = time.monotonic()
    guest = start_guest("cold", cold=True)
    assert guest.client.hello_info is not None
    assert guest.client.hello_info.protocol == 2
    info = guest.hv.info(guest.runtime)
    assert info.state is VMState.RUNNING
    assert info.vcpus == 1 and info.memory_mib == 256
    assert time.monotonic() - started < HELLO_TIMEOUT
    # The console log keeps the boot output although nobody attached to the console socket.
    assert guest.runtime.serial_log.stat().st_size > 0
    guest.close()


def _uefi_spec(uefi_image, vm_id: str) -> VMSpec:  # noqa: ANN001
    return VMSpec(
        vm_id=vm_id,
        boot="uefi",
        memory_mib=256,
        vcpus=1,
        max_vcpus=2,
        firmware_code=uefi_image.firmware_code,
        disks=(
            DiskSpec(uefi_image.disk, readonly=True, id="esp"),
            DiskSpec(uefi_image.rootfs, readonly=True, id="root"),
        ),
    )


def test_uefi_image_boots_to_the_agent(
    qemu_binary: str,
    uefi_image,
    runtime_root: Path,  # noqa: ANN001
) -> None:
    # QEMU 7.2's TCG aborts on a vCPU hotplug once the running vCPU has claimed every region of
    # the translation buffer (see the next test). The default 32 MiB buffer (16 regions) has
    # been filled and flushed about 6 times by the time the agent answers, so the hotplug lands
    # at a random point of a fill cycle and the last region is taken about 1 time in 16. With
    # 256 MiB the boot to the agent fills about 53 % and has not flushed: 9 of 16 regions are
    # taken, so the hotplug below always finds a free one.
    hv = QemuHypervisor(tb_size_mib=256)
    spec = _uefi_spec(uefi_image, "uefi")
    runtime = RuntimeDir(runtime_root / "uefi")
    hv.start(spec, runtime)
    try:
        client = connect_agent(hv, runtime, HELLO_TIMEOUT, None)
        try:
            assert client.exec(["cat", "/sys/firmware/efi/systab"]).exit_code == 0
        finally:
            client.close()
        # q35 takes a vCPU by hotplug up to max_vcpus; microvm cannot (see below).
        hv.resize(runtime, vcpus=2)
        assert hv.info(runtime).vcpus == 2
        with pytest.raises(NotSupported, match="max_vcpus"):
            hv.resize(runtime, vcpus=3)
        # A hot-plugged device is not on the command line a restore would use.
        snapdir = runtime_root / "uefi-snap"
        snapdir.mkdir()
        with pytest.raises(NotSupported, match="resized"):
            hv.snapshot(runtime, snapdir)
    finally:
        hv.destroy(runtime)


def test_a_vmm_that_crashes_during_cpu_hotplug_is_reported_as_crashed(
    qemu_binary: str,
    uefi_image,
    runtime_root: Path,  # noqa: ANN001
) -> None:
    """A 4 MiB translation buffer with maxcpus=2 has two regions; once the boot's code has
    filled the first, the running vCPU holds both and QEMU 7.2 aborts when a hot-plugged vCPU
    thread asks for its own. The driver says the VMM crashed; no bare socket error escapes."""
    hv = QemuHypervisor(tb_size_mib=4)
    runtime = RuntimeDir(runtime_root / "uefi-crash")
    hv.start(_uefi_spec(uefi_image, "uefi-crash"), runtime)
    try:
        deadline = time.monotonic() + HELLO_TIMEOUT
        while True:
            assert time.monotonic() < deadline, "the translation buffer never half filled"
            with hv._qmp(runtime) as qmp:
                jit = qmp.execute("human-monitor-command", {"command-line": "info jit"})
            found = re.search(r"gen code size\s+(\d+)/(\d+)", jit)
            assert found is not None, jit
            used, capacity = int(found[1]), int(found[2])
            if 0.6 < used / capacity < 0.85:  # in the second region, well before a flush
                break
            time.sleep(0.05)
        with pytest.raises(HypervisorError, match="QEMU crashed during the resize") as caught:
            hv.resize(runtime, vcpus=2)
        assert not isinstance(caught.value, NotSupported)
        assert "tcg_region_initial_alloc" in str(caught.value)
        assert not hv.is_alive(runtime)
    finally:
        hv.destroy(runtime)


def test_info_and_counters_of_a_running_guest(shared_guest: Guest) -> None:
    info = shared_guest.hv.info(shared_guest.runtime)
    assert info.state is VMState.RUNNING
    assert info.pid == shared_guest.runtime.pid()
    # A guest restored from a template has its boot's reads in its page cache and a VMM
    # process whose block counters start at zero: make it read its root disk, then look.
    before = shared_guest.hv.counters(shared_guest.runtime)["root"]["read_bytes"]
    read = 'echo 3 > /proc/sys/vm/drop_caches && cat "$(readlink -f /usr/bin/python3)" >/dev/null'
    assert shared_guest.client.exec(["sh", "-c", read]).exit_code == 0
    after = shared_guest.hv.counters(shared_guest.runtime)["root"]["read_bytes"]
    assert after > before


def test_pause_stops_the_guest_answering_and_resume_brings_it_back(shared_guest: Guest) -> None:
    hv, runtime, client = shared_guest.hv, shared_guest.runtime, shared_guest.client
    assert client.ping(timeout=5) < 5
    hv.pause(runtime)
    try:
        assert hv.info(runtime).state is VMState.PAUSED
        with pytest.raises(AgentTimeout):
            client.ping(timeout=1.0)
    finally:
        hv.resume(runtime)
    assert hv.info(runtime).state is VMState.RUNNING
    assert client.ping(timeout=10) < 10


def test_resize_on_microvm_is_not_supported(shared_guest: Guest) -> None:
    with pytest.raises(NotSupported, match="microvm"):
        shared_guest.hv.resize(shared_guest.runtime, vcpus=2)
    with pytest.raises(NotSupported, match="microvm"):
        shared_guest.hv.resize(shared_guest.runtime, memory_mib=512)


def test_snapshot_then_restore_in_a_new_process_keeps_guest_ram(
    start_guest: Callable[..., Guest], runtime_root: Path
) -> None:
    guest = start_guest("snapsrc")
    marker = os.urandom(16).hex()
    assert guest.client.exec(["sh", "-c", f"echo {marker} > /tmp/marker"]).exit_code == 0
    snapdir = runtime_root / "snap1"
    snapdir.mkdir()
    snap = guest.hv.snapshot(guest.runtime, snapdir)
    assert guest.hv.info(guest.runtime).state is VMState.PAUSED
    assert (snapdir / "state.bin").stat().st_size > 1 << 20
    old_pid = guest.runtime.pid()
    guest.client.close()
    guest.hv.stop_hard(guest.runtime)
    assert not guest.hv.is_alive(guest.runtime)

    new_pid = guest.hv.restore(guest.spec, guest.runtime, snap)
    assert new_pid != old_pid
    assert guest.hv.info(guest.runtime).state is VMState.RUNNING
    client = guest.reconnect(timeout=30)
    assert client.exec(["cat", "/tmp/marker"]).stdout.strip() == marker.encode()


def test_reconciler_finds_a_killed_vmm_and_tears_down_orphans(
    start_guest: Callable[..., Guest], runtime_root: Path
) -> None:
    victim = start_guest("victim")
    orphan = start_guest("orphan")
    victim_pid = victim.runtime.pid()
    assert victim_pid is not None
    os.kill(victim_pid, signal.SIGKILL)
    assert process.wait_for(lambda: not victim.hv.is_alive(victim.runtime), 10)

    # Everything but "orphan" is known to the control plane.
    known = {p.name for p in runtime_root.iterdir()} - {"orphan"}
    report = reconcile.scan(runtime_root, known_ids=known)
    assert [d.vm_id for d in report.dead] == ["victim"]
    assert report.dead[0].pid == victim_pid
    assert [o.vm_id for o in report.orphans] == ["orphan"]
    assert "victim" not in report.alive

    reconcile.teardown_orphans(report.orphans)
    assert not orphan.hv.is_alive(orphan.runtime)
    assert not orphan.runtime.root.exists()
    assert reconcile.scan(runtime_root, known_ids=known).orphans == []


def test_destroy_leaves_no_process_socket_or_file(start_guest: Callable[..., Guest]) -> None:
    guest = start_guest("doomed")
    assert _qemu_pids_for(guest.runtime)
    guest.client.close()
    guest.hv.destroy(guest.runtime)
    assert not guest.runtime.root.exists()
    assert _qemu_pids_for(guest.runtime) == []
    assert not guest.hv.is_alive(guest.runtime)
    guest.hv.destroy(guest.runtime)  # idempotent


def test_graceful_shutdown_powers_the_guest_off_and_keeps_qemu_for_inspection(
    start_guest: Callable[..., Guest],
) -> None:
    guest = start_guest("poweroff")
    path = guest.hv.graceful_shutdown(
        guest.runtime, lambda: guest.client.shutdown("poweroff"), button_grace=10.0, timeout=30
    )
    assert path == "acpi"  # the image's acpid honours the button: the agent was not needed
    assert guest.hv.is_alive(guest.runtime)  # -no-shutdown: the VMM waits to be destroyed
    assert guest.hv.info(guest.runtime).state is VMState.SHUTDOWN
    guest.close()
    assert not guest.runtime.root.exists()


def test_restore_refuses_a_spec_of_another_shape(
    hv: QemuHypervisor,
    templates,
    make_spec,
    runtime_root: Path,  # noqa: ANN001
) -> None:
    snap = templates.ensure(make_spec("shape"))
    runtime = RuntimeDir(runtime_root / "shape")
    with pytest.raises(HypervisorError, match="does not match"):
        hv.restore(make_spec("shape", memory_mib=512), runtime, snap)
    assert not hv.is_alive(runtime)


def test_restore_of_a_truncated_state_fails_cleanly(
    hv: QemuHypervisor,
    templates,
    make_spec,
    runtime_root: Path,  # noqa: ANN001
) -> None:
    snap = templates.ensure(make_spec("trunc"))
    broken = runtime_root / "broken-snap"
    broken.mkdir()
    (broken / "snapshot.json").write_bytes((snap.directory / "snapshot.json").read_bytes())
    with open(snap.directory / "state.bin", "rb") as src:
        (broken / "state.bin").write_bytes(src.read(1 << 20))
    runtime = RuntimeDir(runtime_root / "trunc")
    with pytest.raises(HypervisorError, match="restore failed"):
        hv.restore(make_spec("trunc"), runtime, SnapshotFiles(broken, ()))
    assert not hv.is_alive(runtime)
    assert _qemu_pids_for(runtime) == []
    hv.destroy(runtime)


def test_template_serves_a_fresh_data_disk_but_never_one_with_data(
    hv: QemuHypervisor,
    templates,
    make_spec,
    runtime_root: Path,  # noqa: ANN001
) -> None:
    from vms.hypervisors.templates import disk_is_fresh
    from vms.images import make_data_disk

    disk = runtime_root / "data-vm.img"
    make_data_disk(disk, 64)
    base = make_spec("datavm")
    spec = base.replace(disks=(*base.disks, DiskSpec(disk, id="data")))
    assert disk_is_fresh(disk)
    assert templates.usable_for(spec) is None
    runtime = RuntimeDir(runtime_root / "datavm")
    try:
        result = templates.start(spec, runtime, fallback=False)
        assert result.restored
        client = connect_agent(hv, runtime, 30, result.guest_secret)
        try:
            wrote = client.exec(["sh", "-c", "echo kept > /data/kept && sync && cat /data/kept"])
            assert wrote.stdout == b"kept\n", wrote
        finally:
            client.close()
    finally:
        hv.destroy(runtime)
    # The disk now holds the guest's data: restoring the template would replace it.
    assert not disk_is_fresh(disk)
    assert "has been used" in (templates.usable_for(spec) or "")
    with pytest.raises(HypervisorError, match="has been used"):
        templates.start(spec, runtime, fallback=False)
    assert not hv.is_alive(runtime)
    hv.destroy(runtime)
