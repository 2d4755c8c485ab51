"""QEMU driver NICs without QEMU: the TAP by descriptor on the command line, what vm.json keeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from vms.hypervisors.base import HypervisorError, NetSpec, RuntimeDir, VMSpec
from vms.hypervisors.qemu import QemuHypervisor, spec_from_dict, spec_to_dict


@pytest.fixture
def spec(tmp_path: Path) -> VMSpec:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    return VMSpec(vm_id="nic-vm", memory_mib=128, kernel=kernel)


def _netdevs(argv: list[str]) -> list[str]:
    return [
        argv[i + 1]
        for i, a in enumerate(argv)
        if a in ("-netdev", "-device") and "net" in argv[i + 1]
    ]


def test_a_tap_descriptor_goes_to_netdev_fd_with_the_mac_on_the_device(spec: VMSpec) -> None:
    net = NetSpec("tap-a", "52:54:00:AA:00:01", fd=7, netns="sbx")
    argv = QemuHypervisor(seccomp=False).build_argv(
        spec.replace(nets=(net,)), RuntimeDir(Path("/r")), "tcg"
    )
    assert _netdevs(argv) == [
        "tap,id=net0,fd=7",
        "virtio-net-device,netdev=net0,id=net0-dev,mac=52:54:00:aa:00:01",
    ]


def test_without_a_descriptor_qemu_opens_the_tap_by_name(spec: VMSpec) -> None:
    net = NetSpec("tap-b", "52:54:00:aa:00:02", id="lan")
    argv = QemuHypervisor(seccomp=False).build_argv(
        spec.replace(nets=(net,)), RuntimeDir(Path("/r")), "tcg"
    )
    assert "tap,id=lan,ifname=tap-b,script=no,downscript=no" in argv


def test_the_recorded_spec_keeps_the_nic_but_never_the_descriptor(spec: VMSpec) -> None:
    net = NetSpec(
        "tap-c", "52:54:00:aa:00:03", fd=9, netns="sbx", address="10.1.0.5/24",
        gateway="10.1.0.1", dns=("10.1.0.1",),
    )  # fmt: skip
    raw = spec_to_dict(spec.replace(nets=(net,)))
    assert "fd" not in raw["nets"][0]
    back = spec_from_dict(raw).nets[0]
    assert back == NetSpec(
        "tap-c", "52:54:00:aa:00:03", netns="sbx", address="10.1.0.5/24", gateway="10.1.0.1",
        dns=("10.1.0.1",),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("net", "message"),
    [
        (NetSpec("tap-d", "52:54:00:aa:00:04", fd=1), "invalid TAP descriptor"),
        (NetSpec("tap-d", "52:54:00:aa:00:04", fd=True), "invalid TAP descriptor"),
        (NetSpec("tap-d", "52:54:00:aa:00:04", netns="../x"), "invalid network namespace"),
        (NetSpec("tap,d", "52:54:00:aa:00:04"), "invalid tap name"),
        (NetSpec("tap-d", "53:54:00:aa:00:04"), "multicast"),
    ],
)
def test_invalid_nics_are_refused(spec: VMSpec, net: NetSpec, message: str) -> None:
    with pytest.raises(HypervisorError, match=message):
        QemuHypervisor().validate(spec.replace(nets=(net,)))
