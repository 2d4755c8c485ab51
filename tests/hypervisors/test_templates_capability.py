"""Saved-state templates as a driver capability: which drivers offer them, and the cache's
build-then-restore path driven through the hooks its caller gives it.

The cache is driven by a recording driver (no VMM: what is tested is the order of the driver
and hook calls and where the template lands on disk); real QEMU guests restored from templates
are covered in ``tests/guests``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vms.hypervisors.base import (
    DiskSpec,
    Hypervisor,
    HypervisorError,
    NetSpec,
    RuntimeDir,
    SnapshotFiles,
    TemplateHooks,
    VMInfo,
    VMSpec,
    VMState,
)
from vms.hypervisors.cloud_hypervisor import CloudHypervisor
from vms.hypervisors.qemu import QemuHypervisor
from vms.hypervisors.selection import select_hypervisor
from vms.hypervisors.templates import TemplateCache, TemplateDriver, template_mac


class RecordingDriver:
    """Does what the cache asks without a VMM; ``calls`` lists the verbs in order."""

    name = "recording"

    def __init__(self, shape: str = "v1") -> None:
        self.shape = shape
        self.calls: list[str] = []

    def template_shape(self, spec: VMSpec) -> dict[str, object]:
        return {"vmm": self.shape}

    def start(self, spec: VMSpec, runtime: RuntimeDir) -> int:
        self.calls.append(f"start {spec.vm_id}")
        self.started_macs = [n.mac for n in spec.nets]
        runtime.create()
        return 101

    def set_link(self, runtime: RuntimeDir, nic_id: str, up: bool) -> None:
        self.calls.append(f"set_link {nic_id} {'up' if up else 'down'}")

    def nic_macs(self, runtime: RuntimeDir) -> dict[str, str]:
        return {}

    def restore(self, spec: VMSpec, runtime: RuntimeDir, snapshot: SnapshotFiles) -> int:
        self.calls.append(f"restore {spec.vm_id} from {snapshot.directory.name}")
        runtime.create()
        return 202

    def snapshot_nics(self, snapshot: SnapshotFiles) -> int:
        return 0

    def snapshot(self, runtime: RuntimeDir, directory: Path) -> SnapshotFiles:
        self.calls.append("snapshot")
        state = directory / "state.bin"
        state.write_bytes(b"saved guest")
        return SnapshotFiles(directory, (state,))

    def destroy(self, runtime: RuntimeDir) -> None:
        self.calls.append("destroy")
        shutil.rmtree(runtime.root, ignore_errors=True)

    def stop_hard(self, runtime: RuntimeDir, timeout: float = 5.0) -> None:
        self.calls.append("stop_hard")

    def pause(self, runtime: RuntimeDir) -> None: ...
    def resume(self, runtime: RuntimeDir) -> None: ...
    def power_button(self, runtime: RuntimeDir) -> None: ...
    def reboot(self, runtime: RuntimeDir) -> None: ...
    def resize(
        self, runtime: RuntimeDir, *, vcpus: int | None = None, memory_mib: int | None = None
    ) -> None: ...  # noqa: E501
    def balloon(self, runtime: RuntimeDir, target_mib: int) -> None:
        self.calls.append("balloon")

    def balloon_mib(self, runtime: RuntimeDir) -> int | None:
        return None

    def set_cpu_weight(self, runtime: RuntimeDir, weight: int | None) -> int:
        return 100

    def info(self, runtime: RuntimeDir) -> VMInfo:
        return VMInfo(VMState.RUNNING, 101)

    def counters(self, runtime: RuntimeDir) -> dict[str, dict[str, int]]:
        return {}

    def is_alive(self, runtime: RuntimeDir) -> bool:
        return runtime.root.exists()

    def agent_connect(self, runtime: RuntimeDir, timeout: float):  # noqa: ANN201
        raise HypervisorError("no guest")

    def template_cache(self, hooks: TemplateHooks, **options: object) -> TemplateCache:
        return TemplateCache(self, hooks, **options)  # type: ignore[arg-type]


class RecordingHooks:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.secrets: list[str | None] = []

    def wait_ready(self, hv: Hypervisor, runtime: RuntimeDir, timeout: float) -> str:
        self.calls.append(f"wait_ready {timeout}")
        return "the-template-guest-secret"

    def reset_identity(
        self, hv: Hypervisor, runtime: RuntimeDir, spec: VMSpec, secret: str | None
    ) -> None:
        self.calls.append(f"reset_identity {spec.extra.get('hostname')}")
        self.secrets.append(secret)

    def make_disk(self, path: Path, size_mib: int) -> Path:
        self.calls.append(f"make_disk {size_mib}")
        with open(path, "xb") as fh:
            fh.truncate(size_mib << 20)
        return path

    def bundle(self) -> TemplateHooks:
        return TemplateHooks(self.wait_ready, self.reset_identity, self.make_disk)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    root = tmp_path / "root.img"
    root.write_bytes(b"root")
    data = tmp_path / "data.img"
    with open(data, "xb") as fh:
        fh.truncate(16 << 20)  # all zeros: fresh
    return {"kernel": kernel, "root": root, "data": data}


def make_spec(files: dict[str, Path], vm_id: str, hostname: str) -> VMSpec:
    return VMSpec(
        vm_id=vm_id,
        kernel=files["kernel"],
        disks=(
            DiskSpec(files["root"], readonly=True, id="root"),
            DiskSpec(files["data"], id="data"),
        ),
        extra={"hostname": hostname},
    )


def test_qemu_offers_templates_and_cloud_hypervisor_does_not(tmp_path: Path) -> None:
    hooks = RecordingHooks().bundle()
    cache = QemuHypervisor(accel="tcg").template_cache(
        hooks, cache_dir=tmp_path / "c", scratch_root=tmp_path, boot_timeout=7.0
    )
    assert isinstance(cache, TemplateCache)
    assert cache.hooks is hooks and cache.cache_dir == tmp_path / "c"
    assert (cache.scratch_root, cache.boot_timeout) == (tmp_path, 7.0)
    assert CloudHypervisor().template_cache(hooks) is None


def test_drivers_satisfy_the_protocols() -> None:
    assert isinstance(QemuHypervisor(accel="tcg"), Hypervisor)
    assert isinstance(QemuHypervisor(accel="tcg"), TemplateDriver)
    assert isinstance(CloudHypervisor(), Hypervisor)
    assert isinstance(RecordingDriver(), TemplateDriver)


def test_first_start_builds_the_template_through_the_hooks_then_restores(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    hv, hooks = RecordingDriver(), RecordingHooks()
    cache = TemplateCache(hv, hooks.bundle(), cache_dir=tmp_path / "cache", boot_timeout=9.0)
    spec = make_spec(files, "vm1", "alpha")

    result = cache.start(spec, RuntimeDir(tmp_path / "rt1"), fallback=False)

    assert result.restored and result.pid == 202
    key = cache.key(spec)
    assert hv.calls == [
        f"start template-{key[:12]}",
        "snapshot",
        "destroy",
        f"restore vm1 from {key}",
    ]
    assert hooks.calls == ["make_disk 16", "wait_ready 9.0", "reset_identity alpha"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f".{key}.lock", key]

    # The next VM of that shape restores the saved template: nothing is booted again.
    hv.calls.clear()
    hooks.calls.clear()
    again = cache.start(make_spec(files, "vm2", "beta"), RuntimeDir(tmp_path / "rt2"))
    assert again.restored
    assert hv.calls == [f"restore vm2 from {key}"]
    assert hooks.calls == ["reset_identity beta"]
    # What wait_ready answered (the template agent's credential) is kept beside the saved
    # guest, root-only and out of its files, and handed to reset_identity and the caller.
    assert hooks.secrets == ["the-template-guest-secret"] * 2
    assert result.guest_secret == again.guest_secret == "the-template-guest-secret"
    kept = tmp_path / "cache" / key / "guest-secret"
    assert kept.read_text() == "the-template-guest-secret"
    assert kept.stat().st_mode & 0o777 == 0o600
    assert "the-template-guest-secret" not in repr(result)
    found = cache.lookup(spec)
    assert found is not None and kept not in found.files


def test_the_driver_shape_is_part_of_the_key(tmp_path: Path, files: dict[str, Path]) -> None:
    hooks = RecordingHooks().bundle()
    spec = make_spec(files, "vm1", "alpha")
    one = TemplateCache(RecordingDriver("v1"), hooks, cache_dir=tmp_path)
    other = TemplateCache(RecordingDriver("v2"), hooks, cache_dir=tmp_path)
    assert one.key(spec) != other.key(spec)


def test_a_failed_build_leaves_no_template_and_falls_back_to_a_cold_boot(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    hv, hooks = RecordingDriver(), RecordingHooks()

    def never_ready(hv: Hypervisor, runtime: RuntimeDir, timeout: float) -> None:
        raise TimeoutError("the agent did not answer")

    bundle = TemplateHooks(never_ready, hooks.reset_identity, hooks.make_disk)
    cache = TemplateCache(hv, bundle, cache_dir=tmp_path / "cache")
    spec = make_spec(files, "vm1", "alpha")

    result = cache.start(spec, RuntimeDir(tmp_path / "rt"))

    assert not result.restored and result.pid == 101
    assert "the agent did not answer" in result.reason
    assert cache.lookup(spec) is None
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    assert hooks.calls == ["make_disk 16"]  # no identity reset: the cold boot has its own


def test_select_hypervisor(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(select_hypervisor("qemu"), QemuHypervisor)
    for name in ("cloud-hypervisor", "cloud_hypervisor", "CH "):
        assert isinstance(select_hypervisor(name), CloudHypervisor)
    with pytest.raises(HypervisorError, match="use auto, cloud-hypervisor or qemu"):
        select_hypervisor("firecracker")
    # auto without a cloud-hypervisor binary: QEMU, whatever KVM can do.
    monkeypatch.setenv("PATH", "/nonexistent")
    assert isinstance(select_hypervisor("auto"), QemuHypervisor)
    monkeypatch.setenv("SANDBOX_HYPERVISOR", "qemu")
    assert isinstance(select_hypervisor(), QemuHypervisor)


def test_a_nic_template_has_its_own_macs_and_boots_unplugged_until_ready(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    hv, hooks = RecordingDriver(), RecordingHooks()
    cache = TemplateCache(hv, hooks.bundle(), cache_dir=tmp_path / "cache")  # type: ignore[arg-type]
    spec = make_spec(files, "vmn", "nic").replace(
        nets=(NetSpec("tapn0", "52:54:00:00:00:01", fd=7, netns="sbx"),)
    )
    assert cache.usable_for(spec) is None
    assert cache.start(spec, RuntimeDir(tmp_path / "rtn"), fallback=False).restored
    key = cache.key(spec)
    assert hv.started_macs == [template_mac(key, 0)] != ["52:54:00:00:00:01"]
    assert int(template_mac(key, 0)[:2], 16) & 3 == 2  # locally administered, unicast
    building = [c for c in hv.calls if c.startswith(("start", "set_link", "snapshot"))]
    assert building == [
        f"start template-{key[:12]}",
        "set_link net0 down",
        "set_link net0 up",
        "snapshot",
    ]
    assert hooks.calls.index("wait_ready 180.0") >= 0
    # NICs count in the shape; their TAPs, MACs and addresses do not.
    other = spec.replace(nets=(NetSpec("tapn1", "52:54:00:00:00:02"),))
    assert cache.key(other) == key
    assert cache.key(spec.replace(nets=())) != key


def test_network_ready_comes_before_anything_can_bring_a_guest_link_up(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    hv, hooks = RecordingDriver(), RecordingHooks()
    cache = TemplateCache(hv, hooks.bundle(), cache_dir=tmp_path / "cache")  # type: ignore[arg-type]
    spec = make_spec(files, "vmn", "nic").replace(
        nets=(NetSpec("tapn0", "52:54:00:00:00:01", fd=7, netns="sbx"),)
    )

    def ready() -> None:
        hv.calls.append("network ready")

    # No template yet: the build boots a guest on the TAP, so the NIC is ready before it.
    cache.start(spec, RuntimeDir(tmp_path / "rt1"), fallback=False, network_ready=ready)
    key = cache.key(spec)
    assert hv.calls[:2] == ["network ready", f"start template-{key[:12]}"]
    # A restore: the host side is set up while the VMM restores, ready before the identity.
    hv.calls.clear()
    order: list[str] = []
    bundle = TemplateHooks(
        hooks.wait_ready,
        lambda h, rt, s, secret: order.extend(hv.calls + ["reset_identity"]),
        hooks.make_disk,
    )
    cache = TemplateCache(hv, bundle, cache_dir=tmp_path / "cache")  # type: ignore[arg-type]
    cache.start(spec, RuntimeDir(tmp_path / "rt2"), fallback=False, network_ready=ready)
    assert order == [f"restore vmn from {key}", "network ready", "reset_identity"]

    # A NIC that could not be plugged: no identity, no cold boot on it; the reason is raised.
    def broken() -> None:
        raise HypervisorError("the rules did not load")

    hv.calls.clear()
    order.clear()
    with pytest.raises(HypervisorError, match="the rules did not load"):
        cache.start(spec, RuntimeDir(tmp_path / "rt3"), network_ready=broken)
    assert order == []
    assert not any(c.startswith("start") for c in hv.calls)
