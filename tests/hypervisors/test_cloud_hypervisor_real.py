"""The Cloud Hypervisor lifecycle with a real ``cloud-hypervisor`` and a real Linux guest.

Runs wherever the binary is on PATH and KVM can really run a guest (``probe.kvm_usable``: an
existing /dev/kvm is not proof), and skips with that reason elsewhere. It proves what the
simulator cannot: that the released server accepts our VmConfig and really boots it, that the
guest's agent answers over hybrid vsock, that a snapshot restores into a working guest in a new
process, and that counters and resize reflect a real guest.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vms.hypervisors.base import DiskSpec, RuntimeDir, VMSpec, VMState
from vms.hypervisors.cloud_hypervisor import CloudHypervisor
from vms.hypervisors.process import wait_for

pytestmark = pytest.mark.guest

BOOT_TIMEOUT = 120.0  # what CH's own integration tests allow a guest to boot


def _skip_reason() -> str | None:
    if shutil.which("cloud-hypervisor") is None:
        return "cloud-hypervisor binary not found on PATH"
    from vms.hypervisors.probe import kvm_usable

    usable, reason = kvm_usable()
    if not usable:
        return f"no usable KVM: {reason}"
    return None


@pytest.fixture(scope="module")
def image() -> Any:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from vms.images import ImageNotBuilt, linux_image

    try:
        return linux_image()
    except ImageNotBuilt as exc:
        pytest.skip(f"guest image not built: {exc}")


@pytest.fixture
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="chr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# The first guest is enrolled with it; its restored copy has it still (saved RAM).
CREDENTIAL = "ch-real-test-credential-0123456789-abcdefgh"


def _agent(driver: CloudHypervisor, runtime: RuntimeDir) -> Any:
    from vms.agent.client import AgentClient

    return AgentClient(
        lambda: driver.agent_connect(runtime, BOOT_TIMEOUT), timeout=30, credential=CREDENTIAL
    )


def test_real_guest_lifecycle(image: Any, work: Path) -> None:
    from vms.images import make_data_disk

    driver = CloudHypervisor(slow_timeout=300.0)
    data = make_data_disk(work / "data.raw", 64)
    spec = VMSpec(
        vm_id="ch-real",
        vcpus=1,
        max_vcpus=2,
        memory_mib=512,
        max_memory_mib=1024,
        kernel=image.kernel,
        initramfs=image.initramfs,
        cmdline=image.cmdline,
        disks=(
            DiskSpec(path=image.rootfs, readonly=True, id="root"),
            DiskSpec(path=data, id="data"),
        ),
    )
    first, second = RuntimeDir(work / "a"), RuntimeDir(work / "b")
    try:
        driver.start(spec, first)
        assert driver.info(first).state is VMState.RUNNING
        with _agent(driver, first) as agent:
            agent.hello_enrolling(CREDENTIAL, timeout=BOOT_TIMEOUT)
            result = agent.exec(["sh", "-c", "echo hello > /data/mark && sync && cat /data/mark"])
            assert result.ok and result.stdout == b"hello\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as console:
            console.connect(str(first.serial_socket))
            console.settimeout(5)
            assert console.recv(4096)  # v53 replays output from before we attached

        counters = driver.counters(first)
        assert counters["root"]["read_bytes"] > 0
        assert counters["data"]["write_bytes"] > 0

        driver.pause(first)
        assert driver.info(first).state is VMState.PAUSED
        driver.resume(first)
        driver.resize(first, vcpus=2, memory_mib=640)
        info = driver.info(first)
        assert (info.vcpus, info.memory_mib) == (2, 640)

        snap = work / "snap"
        snap.mkdir()
        started = time.monotonic()
        files = driver.snapshot(first, snap)
        snapshot_s = time.monotonic() - started
        assert {"config.json", "state.json", "memory-ranges"} <= {p.name for p in files.files}
        driver.stop_hard(first)

        restored = spec.replace(disks=(spec.disks[0], DiskSpec(path=work / "data2.raw", id="data")))
        started = time.monotonic()
        driver.restore(restored, second, files)
        with _agent(driver, second) as agent:
            agent.hello(timeout=60)
            restore_s = time.monotonic() - started
            result = agent.exec(["cat", "/data/mark"])
            assert result.ok and result.stdout == b"hello\n"
        print(f"snapshot {snapshot_s:.2f}s, restore to agent {restore_s:.2f}s")

        driver.power_button(second)
        if not wait_for(lambda: not driver.is_alive(second), 30):
            driver.shutdown_vmm(second)  # the guest ignored ACPI: a minimal init may
        assert not driver.is_alive(second)
    finally:
        driver.destroy(first)
        driver.destroy(second)
