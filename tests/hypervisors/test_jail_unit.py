"""The jail's parts that need no VMM: its settings, uid slots, cgroup files (on a fake tree, v1
and v2), the spec the launcher gets, and the launcher's refusals before it changes anything."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from vms.hypervisors import jail
from vms.hypervisors.base import DiskSpec, NetSpec, RuntimeDir, VMSpec
from vms.hypervisors.qemu import QemuHypervisor


@pytest.fixture
def config(tmp_path: Path) -> jail.JailConfig:
    return jail.JailConfig(mode="on", state_dir=tmp_path / "state", uid_base=200000, uid_count=3)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mode": "maybe"}, "SANDBOX_JAIL must be"),
        ({"uid_base": 0}, "uid range"),
        ({"uid_count": 0}, "uid range"),
        ({"cgroup_parent": "../escape"}, "cgroup name"),
        ({"cgroup_parent": ""}, "cgroup name"),
        ({"memory_margin_mib": 1}, "margin"),
    ],
)
def test_bad_settings_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(jail.JailError, match=message):
        jail.JailConfig(**changes)  # type: ignore[arg-type]


def test_settings_come_from_the_environment() -> None:
    config = jail.JailConfig.from_env(
        {"SANDBOX_JAIL": "OFF", "SANDBOX_JAIL_UID_BASE": "300000", "SANDBOX_JAIL_CGROUP": "x"}
    )
    assert (config.mode, config.uid_base, config.cgroup_parent) == ("off", 300000, "x")
    with pytest.raises(jail.JailError, match="invalid jail setting"):
        jail.JailConfig.from_env({"SANDBOX_JAIL_UID_BASE": "lots"})


def test_auto_jails_only_as_root_and_on_without_root_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert not jail.JailConfig(mode="auto").enabled
    assert jail.JailConfig(mode="auto").describe()["warning"] == jail.OFF_WARNING
    with pytest.raises(jail.JailError, match="needs the worker to run as root"):
        jail.JailConfig(mode="on").check()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert jail.JailConfig(mode="auto").enabled
    assert jail.JailConfig(mode="auto").describe() == {"mode": "auto", "jailed": True}
    assert not jail.JailConfig(mode="off").enabled


def test_a_runtime_directory_keeps_its_uid_and_a_gone_one_gives_it_back(
    config: jail.JailConfig, tmp_path: Path
) -> None:
    a, b, c, d = (tmp_path / n for n in "abcd")
    for path in (a, b, c, d):
        path.mkdir()
    first = jail.allocate_uid(config, a)
    assert first == config.uid_base
    assert jail.allocate_uid(config, a) == first  # the same VM, the same uid
    second = jail.allocate_uid(config, b)
    third = jail.allocate_uid(config, c)
    assert len({first, second, third}) == 3
    with pytest.raises(jail.JailError, match="all 3 jail uids"):
        jail.allocate_uid(config, d)
    # A VM destroyed without release: its directory is gone, its uid is taken back.
    b.rmdir()
    assert jail.allocate_uid(config, d) == second
    # release() frees the slot of a removed runtime directory, and keeps a live one's.
    jail.release(config, a, "x")
    assert jail.allocate_uid(config, a) == first
    a.rmdir()
    jail.release(config, a, "x")
    assert not (config.state_dir / "uids" / str(first)).exists()


def _spec(**changes: object) -> jail.JailSpec:
    base = jail.JailSpec(
        name="vm-200000", uid=200000, gid=200000, runtime="/run/x/vm", pidfile="/run/x/vm/vmm.pid"
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"uid": 0}, "system user"),
        ({"gid": 10}, "system user"),
        ({"name": "../x"}, "invalid jail name"),
        ({"runtime": "relative"}, "absolute and normal"),
        ({"ro_paths": ("/a/../etc/shadow",)}, "absolute and normal"),
        ({"rw_paths": ("/",)}, "absolute and normal"),
        ({"devices": ("/etc/shadow",)}, "not a device"),
    ],
)
def test_a_jail_spec_is_validated(changes: dict[str, object], message: str) -> None:
    with pytest.raises(jail.JailError, match=message):
        _spec(**changes).validate()


def test_a_jail_spec_travels_as_json() -> None:
    spec = _spec(ro_paths=("/img/vmlinuz",), rw_paths=("/data/d.img",), pass_env=("A",))
    assert jail.JailSpec.from_json(spec.to_json()) == spec
    argv = jail.launcher_argv(spec)
    assert argv[-1] == spec.to_json() and argv[-2] == jail.__file__


def test_cgroup_v2_limits_are_written_and_the_controllers_enabled(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tmp_path / "sbx").mkdir()
    (tmp_path / "sbx" / "cgroup.controllers").write_text("cpu memory pids\n")
    cgroups = jail.Cgroups(mount=tmp_path)
    assert cgroups.version == 2
    spec = _spec(cgroup_parent="sbx", memory_bytes=600 << 20, cpu_weight=200, pids_max=64)
    (where,) = cgroups.setup(spec)
    assert where == tmp_path / "sbx" / "vm-200000"
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (where / "memory.max").read_text() == str(600 << 20)
    assert (where / "cpu.weight").read_text() == "200"
    assert (where / "pids.max").read_text() == "64"
    assert (where / "cgroup.procs").read_text() == str(os.getpid())
    assert cgroups.memory_limit("sbx", "vm-200000") == 600 << 20


def test_cgroup_v1_limits_are_written_per_controller(tmp_path: Path) -> None:
    for controller in ("memory", "cpu", "pids"):
        (tmp_path / controller).mkdir()
    cgroups = jail.Cgroups(mount=tmp_path)
    assert cgroups.version == 1
    spec = _spec(cgroup_parent="sbx", memory_bytes=600 << 20, cpu_weight=200, pids_max=64)
    cgroups.setup(spec)
    assert (tmp_path / "memory/sbx/vm-200000/memory.limit_in_bytes").read_text() == str(600 << 20)
    assert (tmp_path / "cpu/sbx/vm-200000/cpu.shares").read_text() == "2048"
    assert (tmp_path / "pids/sbx/vm-200000/pids.max").read_text() == "64"
    assert cgroups.memory_limit("sbx", "vm-200000") == 600 << 20


def _launch(spec: jail.JailSpec, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*jail.launcher_argv(spec), "--", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_launcher_refuses_an_image_the_jailed_user_could_not_read(tmp_path: Path) -> None:
    secret = tmp_path / "private.img"
    secret.write_bytes(b"x")
    secret.chmod(0o600)
    spec = _spec(runtime=str(tmp_path), pidfile=str(tmp_path / "vmm.pid"), ro_paths=(str(secret),))
    done = _launch(spec, "true")
    assert done.returncode == 1
    assert "not readable by other users" in done.stderr
    assert not (tmp_path / "vmm.pid").exists()


def test_the_launcher_refuses_a_missing_binary_and_a_bad_spec(tmp_path: Path) -> None:
    spec = _spec(runtime=str(tmp_path), pidfile=str(tmp_path / "vmm.pid"))
    done = _launch(spec, "no-such-vmm")
    assert done.returncode == 1 and "no-such-vmm not found" in done.stderr
    bad = subprocess.run(
        [*jail.launcher_argv(spec)[:-1], spec.to_json().replace("200000", "0"), "--", "true"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert bad.returncode == 1 and "system user" in bad.stderr


def test_the_qemu_jail_follows_the_spec(tmp_path: Path) -> None:
    files = {n: tmp_path / n for n in ("vmlinuz", "initrd", "root.img", "data.img")}
    for path in files.values():
        path.write_bytes(b"\0" * 4096)
    spec = VMSpec(
        vm_id="j1",
        vcpus=2,
        memory_mib=512,
        kernel=files["vmlinuz"],
        initramfs=files["initrd"],
        disks=(DiskSpec(files["root.img"], readonly=True), DiskSpec(files["data.img"])),
        nets=(NetSpec("tap0", "52:54:00:00:00:01", fd=7, netns="sbx"),),
    )
    config = jail.JailConfig(mode="on", state_dir=tmp_path / "state")
    hv = QemuHypervisor(accel="tcg", tb_size_mib=32, jail_config=config)
    runtime = RuntimeDir(tmp_path / "rt")
    runtime.create()
    js = hv.jail_spec(spec, runtime, "tcg")
    assert js.ro_paths == tuple(str(files[n]) for n in ("vmlinuz", "initrd", "root.img"))
    assert js.rw_paths == (str(files["data.img"]),)
    assert js.new_netns  # every NIC is a descriptor opened in the product's namespace
    assert "/dev/kvm" not in js.devices
    assert js.memory_bytes == (512 + 32 + config.memory_margin_mib) << 20
    assert js.cpu_weight == 200
    assert js.fsize_bytes == (512 << 20) + (1 << 30)
    by_name = spec.replace(nets=(NetSpec("tap0", "52:54:00:00:00:01"),))
    assert not hv.jail_spec(by_name, runtime, "kvm").new_netns
    assert "/dev/kvm" in hv.jail_spec(by_name, runtime, "kvm").devices


@pytest.mark.parametrize("version", [1, 2])
def test_a_running_vms_cpu_weight_is_changed_and_read_back(tmp_path: Path, version: int) -> None:
    if version == 2:
        (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
        (tmp_path / "sbx").mkdir()
        (tmp_path / "sbx" / "cgroup.controllers").write_text("cpu memory pids\n")
    else:
        for controller in ("memory", "cpu", "pids"):
            (tmp_path / controller).mkdir()
    cgroups = jail.Cgroups(mount=tmp_path)
    cgroups.setup(_spec(cgroup_parent="sbx", cpu_weight=100))
    config = jail.JailConfig(mode="on", cgroup_parent="sbx")
    assert jail.reweigh(config, "vm-200000", 10, cgroups) == 100
    assert cgroups.cpu_weight("sbx", "vm-200000") == 10
    where = "sbx/vm-200000/cpu.weight" if version == 2 else "cpu/sbx/vm-200000/cpu.shares"
    assert (tmp_path / where).read_text() == ("10" if version == 2 else "102")
    assert jail.reweigh(config, "vm-200000", 100, cgroups) == 10
    with pytest.raises(jail.JailError, match="1..10000"):
        cgroups.set_cpu_weight("sbx", "vm-200000", 0)
    with pytest.raises(jail.JailError, match="no CPU cgroup"):
        jail.reweigh(config, "vm-gone", 10, cgroups)


def test_a_uid_taken_back_loses_the_cgroups_its_old_vm_left(tmp_path: Path) -> None:
    config = jail.JailConfig(
        mode="on",
        state_dir=tmp_path / "state",
        uid_base=200100,
        uid_count=1,
        cgroup_parent="jail-unit-test",
    )
    cgroups = jail.Cgroups()
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    uid = jail.allocate_uid(config, old)
    left = list(cgroups.dirs(config.cgroup_parent, f"gone-{uid}").values())
    try:
        for d in left:
            d.mkdir(parents=True)  # a VM killed without destroy() (the reconciler's orphans)
        old.rmdir()
        assert jail.allocate_uid(config, new) == uid
        assert not any(d.exists() for d in left)
    finally:
        for d in left:
            with contextlib.suppress(OSError):
                d.rmdir()
            with contextlib.suppress(OSError):
                d.parent.rmdir()


def test_the_last_release_removes_the_parent_cgroups_and_the_roots_directory(
    config: jail.JailConfig, tmp_path: Path
) -> None:
    """A host with no jailed VMM keeps nothing of the jails: the last VM's release removes the
    parent cgroups and the roots' directory; an earlier one leaves them to the VMs still there."""
    mount = tmp_path / "cgroup"
    for controller in ("memory", "cpu", "pids"):
        (mount / controller).mkdir(parents=True)
    cgroups = jail.Cgroups(mount=mount)
    a, b = tmp_path / "a", tmp_path / "b"
    names = {}
    for runtime in (a, b):
        runtime.mkdir()
        uid = jail.allocate_uid(config, runtime)
        names[runtime] = f"vm-{uid}"
        # Empty, as a real cgroup directory is to rmdir (its files are the kernel's).
        for d in cgroups.dirs(config.cgroup_parent, names[runtime]).values():
            d.mkdir(parents=True)
        (config.state_dir / "roots" / names[runtime]).mkdir(parents=True)
    parents = [mount / c / config.cgroup_parent for c in ("memory", "cpu", "pids")]
    a.rmdir()
    jail.release(config, a, names[a], cgroups)
    assert all(p.is_dir() for p in parents) and (config.state_dir / "roots").is_dir()
    assert not (mount / "memory" / config.cgroup_parent / names[a]).exists()
    b.rmdir()
    jail.release(config, b, names[b], cgroups)
    assert not any(p.exists() for p in parents)
    assert not (config.state_dir / "roots").exists()
    assert list((config.state_dir / "uids").iterdir()) == [config.state_dir / "uids" / ".lock"]
