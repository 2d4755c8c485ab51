"""A snapshot is restored on the image it was taken on: pinned while the image is kept, refused
with that reason once it is gone, and the log says which image each VM runs.

The worker's handlers run for real against a recording stand-in hypervisor (no guest: what is
tested is which image files the worker hands the driver, and what the log says), over an image
cache fabricated the way build.py writes it (manifest + ``current`` pointer).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ValidationError

from accounts.caller import Caller
from audit.models import Event
from tests.vms.test_image_contract import build, fabricate, image_id_of
from vms import commands, images, reconcile, runtime, worker
from vms.agent import readiness
from vms.hypervisors.base import (
    RuntimeDir,
    SnapshotFiles,
    StartResult,
    TemplateHooks,
    VMInfo,
    VMSpec,
    VMState,
)
from vms.models import Snapshot, VirtualMachine

pytestmark = pytest.mark.django_db


class RecordingHypervisor:
    """Does what the worker asks without a VMM, and remembers the specs it was given."""

    name = "recording"

    def __init__(self) -> None:
        self.alive: set[Path] = set()
        self.paused: set[Path] = set()
        self.starts: list[VMSpec] = []
        self.restores: list[VMSpec] = []
        # What each VMM's balloon leaves its guest (MiB; absent: no balloon device), and what a
        # restored guest comes back with (the balloon's target is part of its saved state).
        self.balloons: dict[Path, int] = {}
        self.saved_balloon: int | None = None

    def start(self, spec: VMSpec, rt: RuntimeDir) -> int:
        self.starts.append(spec)
        self.alive.add(rt.root)
        return 4242

    def restore(self, spec: VMSpec, rt: RuntimeDir, snapshot: SnapshotFiles) -> int:
        self.restores.append(spec)
        self.alive.add(rt.root)
        if self.saved_balloon is not None:
            self.balloons[rt.root] = self.saved_balloon
        return 4343

    def balloon_mib(self, rt: RuntimeDir) -> int | None:
        return self.balloons.get(rt.root)

    def balloon(self, rt: RuntimeDir, target_mib: int) -> None:
        self.balloons[rt.root] = target_mib

    def snapshot_nics(self, snapshot: SnapshotFiles) -> int:
        return 0  # networking is off under these tests: no VM has a NIC

    def snapshot(self, rt: RuntimeDir, directory: Path) -> SnapshotFiles:
        state = directory / "state.bin"
        state.write_bytes(b"guest memory")
        return SnapshotFiles(directory=directory, files=(state,))

    def pause(self, rt: RuntimeDir) -> None:
        self.paused.add(rt.root)

    def resume(self, rt: RuntimeDir) -> None:
        self.paused.discard(rt.root)

    def info(self, rt: RuntimeDir) -> VMInfo:
        if rt.root not in self.alive:
            return VMInfo(state=VMState.DEAD, pid=None)
        paused = rt.root in self.paused
        return VMInfo(state=VMState.PAUSED if paused else VMState.RUNNING, pid=4242)

    def is_alive(self, rt: RuntimeDir) -> bool:
        return rt.root in self.alive

    def destroy(self, rt: RuntimeDir) -> None:
        self.alive.discard(rt.root)
        self.paused.discard(rt.root)
        self.balloons.pop(rt.root, None)
        shutil.rmtree(rt.root, ignore_errors=True)

    def template_cache(self, hooks: TemplateHooks, **_: Any) -> None:
        return None  # no saved-state templates: every start is a cold boot


class RecordingStarter:
    """A driver's saved-state templates, recorded: every start is a restore."""

    def __init__(self, hv: RecordingHypervisor) -> None:
        self.hv = hv
        self.specs: list[VMSpec] = []

    def start(
        self,
        spec: VMSpec,
        rt: RuntimeDir,
        *,
        fallback: bool = True,
        network_ready: Callable[[], None] | None = None,
    ) -> StartResult:
        if network_ready is not None:
            network_ready()
        self.specs.append(spec)
        self.hv.alive.add(rt.root)
        return StartResult(pid=5151, restored=True, seconds=0.01)


class FakeAgent:
    def __enter__(self) -> FakeAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def configure(self, **_: Any) -> None:
        return None


@pytest.fixture
def hv(monkeypatch: pytest.MonkeyPatch, vm_dirs: dict[str, Path]) -> RecordingHypervisor:
    fake = RecordingHypervisor()
    monkeypatch.setattr(runtime, "hypervisor", lambda: fake)
    monkeypatch.setattr(worker, "_agent", lambda vm, timeout=0: FakeAgent())
    monkeypatch.setattr(worker, "_give_own_credential", lambda vm, current, reason, request: None)
    return fake


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "image-cache"
    root.mkdir()
    monkeypatch.setenv("SANDBOX_IMAGE_CACHE", str(root))
    monkeypatch.delenv("SANDBOX_IMAGE_DIR", raising=False)
    return root


@pytest.fixture
def owner(make_user: Any) -> Caller:
    return Caller.for_user(make_user("operator", "img-owner"), channel="api")


def run(accepted: commands.Accepted) -> VirtualMachine:
    """Carry the request out as the worker task would, then read the VM back."""
    worker.handle(str(accepted.request.event_id))
    return VirtualMachine.objects.get(pk=accepted.vm_id)


def outcome_of(accepted: commands.Accepted) -> Event:
    return Event.objects.get(causation_id=accepted.request.event_id, type__startswith="vm.re")


def started_vm_with_snapshot(
    owner: Caller, cache: Path, image: Path
) -> tuple[VirtualMachine, Snapshot]:
    build.point_current(cache, image)
    vm = run(commands.create(owner, name="pinned", template="linux-small"))
    assert vm.state == "running", vm.last_error
    accepted = commands.snapshot(owner, vm, name="on-first-image")
    vm = run(accepted)
    assert accepted.snapshot is not None
    snap = Snapshot.objects.get(pk=accepted.snapshot.pk)
    assert snap.state == "ready", snap.last_error
    return vm, snap


def test_the_image_id_goes_into_vm_started_and_snapshot_created(
    owner: Caller, cache: Path, hv: RecordingHypervisor
) -> None:
    first = fabricate(cache, "a000000000000001", b"first")
    vm, snap = started_vm_with_snapshot(owner, cache, first)
    started = Event.objects.get(aggregate_id=str(vm.pk), type="vm.started")
    assert started.payload["image_id"] == image_id_of(first)
    assert hv.starts[0].kernel == first / "vmlinuz"
    assert hv.starts[0].disks[0].path == first / "rootfs.ext4"
    assert vm.image_id == image_id_of(first)
    created = Event.objects.get(aggregate_id=str(snap.pk), type="snapshot.created")
    assert created.payload["image_id"] == image_id_of(first)
    assert snap.image_id == image_id_of(first)


def test_a_snapshot_taken_on_one_image_refuses_to_restore_on_another(
    owner: Caller, cache: Path, hv: RecordingHypervisor
) -> None:
    first = fabricate(cache, "a000000000000001", b"first")
    vm, snap = started_vm_with_snapshot(owner, cache, first)
    first_id = image_id_of(first)
    # A second image (another id) becomes current, and the first is removed from this host.
    second = fabricate(cache, "b000000000000002", b"second")
    build.point_current(cache, second)
    # Accepted while the image was there; removed before the worker got to it: the worker's
    # check is the last line (the command's is tested below).
    accepted = commands.restore(owner, vm, snap)
    shutil.rmtree(first)
    vm = run(accepted)

    failed = outcome_of(accepted)
    assert failed.type == "vm.restore_failed"
    assert failed.payload["snapshot_image_id"] == snap.image_id == first_id
    assert failed.payload["current_image_id"] == image_id_of(second) != first_id
    assert first_id in failed.payload["reason"]
    assert "only on the image it was taken on" in failed.payload["reason"]
    assert hv.restores == []  # nothing was restored over the other image's root
    # Refused before anything was touched: the VM still runs, and the log says so.
    assert hv.is_alive(runtime.runtime_dir(vm.pk))
    assert failed.payload["state"] == "running"
    assert vm.state == "running"
    assert vm.last_error == failed.payload["reason"]
    assert not Event.objects.filter(aggregate_id=str(vm.pk), type="vm.restored").exists()


def test_a_clone_of_a_snapshot_whose_image_is_gone_fails_with_that_reason(
    owner: Caller, cache: Path, hv: RecordingHypervisor
) -> None:
    first = fabricate(cache, "a000000000000001", b"first")
    _, snap = started_vm_with_snapshot(owner, cache, first)
    build.point_current(cache, fabricate(cache, "b000000000000002", b"second"))

    accepted = commands.clone(owner, snap, name="clone-elsewhere")
    shutil.rmtree(first)  # after the command's check: the worker refuses it
    clone = run(accepted)

    failed = outcome_of(accepted)
    assert failed.type == "vm.restore_failed"
    assert failed.payload["snapshot_image_id"] == snap.image_id
    assert clone.state == "failed"
    assert hv.restores == []


def test_a_snapshot_is_restored_on_its_own_image_while_it_is_kept(
    owner: Caller, cache: Path, hv: RecordingHypervisor
) -> None:
    first = fabricate(cache, "a000000000000001", b"first")
    vm, snap = started_vm_with_snapshot(owner, cache, first)
    second = fabricate(cache, "b000000000000002", b"second")
    build.point_current(cache, second)  # new VMs get the second image; the first is kept

    accepted = commands.restore(owner, vm, snap)
    vm = run(accepted)

    restored = outcome_of(accepted)
    assert restored.type == "vm.restored", restored.payload
    assert restored.payload["image_id"] == image_id_of(first)
    assert hv.restores[-1].kernel == first / "vmlinuz"
    assert hv.restores[-1].initramfs == first / "initramfs.cpio"
    assert hv.restores[-1].disks[0].path == first / "rootfs.ext4"
    assert vm.image_id == image_id_of(first)
    # A cold start afterwards boots the current image.
    run(commands.stop(owner, vm))
    vm = run(commands.start(owner, VirtualMachine.objects.get(pk=vm.pk)))
    assert vm.image_id == image_id_of(second)
    assert hv.starts[-1].kernel == second / "vmlinuz"


def test_a_refused_restore_of_a_corrupted_snapshot_leaves_a_running_vm_running(
    owner: Caller, cache: Path, hv: RecordingHypervisor, vm_dirs: dict[str, Path]
) -> None:
    first = fabricate(cache, "a000000000000001", b"first")
    vm, snap = started_vm_with_snapshot(owner, cache, first)
    (runtime.snapshot_dir(snap.pk) / "state.bin").write_bytes(b"tampered")

    accepted = commands.restore(owner, vm, snap)
    vm = run(accepted)

    failed = outcome_of(accepted)
    assert failed.type == "vm.restore_failed"
    assert "corrupted" in failed.payload["reason"]
    assert hv.is_alive(runtime.runtime_dir(vm.pk))
    assert failed.payload["state"] == "running"
    assert vm.state == "running"


def test_the_worker_starts_from_templates_when_the_driver_offers_them(
    owner: Caller, cache: Path, hv: RecordingHypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker asks the driver (``template_cache``), not its class, and hands it the hooks
    that know the guest agent and the data disks."""
    starter = RecordingStarter(hv)
    offered: list[TemplateHooks] = []

    def template_cache(hooks: TemplateHooks, **_: Any) -> RecordingStarter:
        offered.append(hooks)
        return starter

    monkeypatch.setattr(hv, "template_cache", template_cache)
    first = fabricate(cache, "a000000000000001", b"first")
    build.point_current(cache, first)

    vm = run(commands.create(owner, name="fast", template="linux-small"))

    assert vm.state == "running", vm.last_error
    started = Event.objects.get(aggregate_id=str(vm.pk), type="vm.started")
    assert started.payload["from_template"] is True and started.payload["pid"] == 5151
    assert hv.starts == [] and [s.kernel for s in starter.specs] == [first / "vmlinuz"]
    assert offered == [worker.TEMPLATE_HOOKS]
    assert offered[0].wait_ready is readiness.wait_ready
    assert offered[0].reset_identity is readiness.reset_identity
    assert offered[0].make_disk is images.make_data_disk


def test_the_worker_cold_boots_when_the_driver_has_no_templates(
    owner: Caller, cache: Path, hv: RecordingHypervisor
) -> None:
    first = fabricate(cache, "a000000000000001", b"first")
    build.point_current(cache, first)

    vm = run(commands.create(owner, name="cold", template="linux-small"))

    assert vm.state == "running", vm.last_error
    started = Event.objects.get(aggregate_id=str(vm.pk), type="vm.started")
    assert started.payload["from_template"] is False and started.payload["pid"] == 4242
    assert [s.kernel for s in hv.starts] == [first / "vmlinuz"]


def _log_length() -> int:
    return Event.objects.count()


@pytest.mark.parametrize("verb", ["restore", "clone"])
def test_a_restore_or_clone_of_a_snapshot_whose_image_is_gone_is_refused_by_the_command(
    owner: Caller, cache: Path, hv: RecordingHypervisor, verb: str
) -> None:
    first = fabricate(cache, "a000000000000001", b"first")
    vm, snap = started_vm_with_snapshot(owner, cache, first)
    build.point_current(cache, fabricate(cache, "b000000000000002", b"second"))
    shutil.rmtree(first)
    before = _log_length()

    with pytest.raises(ValidationError) as refused:
        if verb == "restore":
            commands.restore(owner, vm, snap)
        else:
            commands.clone(owner, snap, name="clone-elsewhere")

    reason = refused.value.message_dict["snapshot"][0]
    assert snap.image_id in reason and "only on the image it was taken on" in reason
    assert _log_length() == before  # nothing appended, no VM created
    assert VirtualMachine.objects.filter(name="clone-elsewhere").count() == 0
    assert hv.restores == []


def test_the_api_answers_400_with_the_reason_for_a_restore_whose_image_is_gone(
    owner: Caller, cache: Path, hv: RecordingHypervisor, token_client: Any
) -> None:
    first = fabricate(cache, "a000000000000001", b"first")
    _, snap = started_vm_with_snapshot(owner, cache, first)
    build.point_current(cache, fabricate(cache, "b000000000000002", b"second"))
    shutil.rmtree(first)
    client = token_client(owner.user)
    before = _log_length()

    for action, body in (("restore", {}), ("clone", {"name": "elsewhere"})):
        response = client.post(f"/api/v1/snapshots/{snap.pk}/{action}/", body, format="json")
        assert response.status_code == 400, response.content
        assert "only on the image it was taken on" in response.content.decode()
    assert _log_length() == before


def _snapshot_with_unknown_image(owner: Caller, cache: Path) -> tuple[VirtualMachine, Snapshot]:
    first = fabricate(cache, "a000000000000001", b"first")
    vm, snap = started_vm_with_snapshot(owner, cache, first)
    Snapshot.objects.filter(pk=snap.pk).update(image_id="")  # as recorded by older versions
    return vm, Snapshot.objects.get(pk=snap.pk)


def test_a_snapshot_that_records_no_image_is_refused_by_the_command_and_the_worker(
    owner: Caller, cache: Path, hv: RecordingHypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm, snap = _snapshot_with_unknown_image(owner, cache)
    with pytest.raises(ValidationError, match="does not record the image"):
        commands.restore(owner, vm, snap)
    # The worker's own check, were such a request in the log (accepted by an older version).
    monkeypatch.setattr(commands, "_check_snapshot_usable", lambda snap: None)
    accepted = commands.restore(owner, vm, snap)
    vm = run(accepted)
    failed = outcome_of(accepted)
    assert failed.type == "vm.restore_failed"
    assert "does not record the image" in failed.payload["reason"]
    assert hv.restores == [] and vm.state == "running"


def _interrupted(owner: Caller, accepted: commands.Accepted, hv: RecordingHypervisor) -> None:
    """The worker launched the VMM for ``accepted`` and died before recording the outcome."""
    vm = VirtualMachine.objects.get(pk=accepted.vm_id)
    request = worker.load_request(str(accepted.request.event_id))
    assert request is not None
    rt = runtime.runtime_dir(vm.pk)
    rt.create()
    spec = runtime.build_spec(vm)
    runtime.record_launched_image(rt, spec)  # what _boot writes before it launches
    hv.start(spec, rt)


def test_a_start_the_reconciler_completes_pins_the_image_the_vmm_runs(
    owner: Caller, cache: Path, hv: RecordingHypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VM cold-booted on image B whose worker died after the launch: its snapshots are pinned
    to B (what runs), not to A (the image of its earlier boot, still in the read model)."""
    first = fabricate(cache, "a000000000000001", b"first")
    second = fabricate(cache, "b000000000000002", b"second")
    build.point_current(cache, first)
    vm = run(commands.create(owner, name="pin", template="linux-small"))
    assert vm.image_id == image_id_of(first)
    vm = run(commands.stop(owner, vm))
    build.point_current(cache, second)
    accepted = commands.start(owner, vm)
    _interrupted(owner, accepted, hv)
    monkeypatch.setattr(worker, "_configure_identity", lambda vm: None)

    assert reconcile._settle(VirtualMachine.objects.get(pk=vm.pk), True) == "completed"

    started = Event.objects.get(causation_id=accepted.request.event_id, type="vm.started")
    assert started.payload["recovered"] is True
    assert started.payload["image_id"] == image_id_of(second)
    vm = VirtualMachine.objects.get(pk=vm.pk)
    assert vm.image_id == image_id_of(second)
    snap_req = commands.snapshot(owner, vm, name="after-recovery")
    run(snap_req)
    assert snap_req.snapshot is not None
    snap = Snapshot.objects.get(pk=snap_req.snapshot.pk)
    assert snap.state == "ready", snap.last_error
    assert snap.image_id == image_id_of(second)


def test_a_snapshot_takes_the_image_of_the_running_vmm_not_the_read_model(
    owner: Caller, cache: Path, hv: RecordingHypervisor
) -> None:
    first = fabricate(cache, "a000000000000001", b"first")
    vm, _ = started_vm_with_snapshot(owner, cache, first)
    VirtualMachine.objects.filter(pk=vm.pk).update(image_id="stale0000")  # a stale projection
    accepted = commands.snapshot(owner, VirtualMachine.objects.get(pk=vm.pk), name="again")
    run(accepted)
    assert accepted.snapshot is not None
    assert Snapshot.objects.get(pk=accepted.snapshot.pk).image_id == image_id_of(first)


def test_a_vmm_whose_image_is_not_known_is_not_snapshotted(
    owner: Caller, cache: Path, hv: RecordingHypervisor
) -> None:
    """A VMM left by a version that recorded no image (or a first start the reconciler
    completed without one): the snapshot is refused with the reason, never pinned to ""."""
    first = fabricate(cache, "a000000000000001", b"first")
    build.point_current(cache, first)
    vm = run(commands.create(owner, name="unknown", template="linux-small"))
    (runtime.runtime_dir(vm.pk).root / runtime.LAUNCHED_IMAGE).unlink()

    accepted = commands.snapshot(owner, vm, name="refused")
    vm = run(accepted)

    failed = Event.objects.get(causation_id=accepted.request.event_id, type="vm.snapshot_failed")
    assert "not recorded" in failed.payload["reason"]
    assert failed.payload["state"] == "running" and vm.state == "running"
    assert accepted.snapshot is not None
    snap = Snapshot.objects.get(pk=accepted.snapshot.pk)
    assert snap.state == "failed" and snap.image_id == ""
    assert not Event.objects.filter(aggregate_id=str(snap.pk), type="snapshot.created").exists()
    assert not runtime.snapshot_dir(snap.pk).exists()


def test_a_first_start_the_reconciler_completes_without_a_recorded_image_says_unknown(
    owner: Caller, cache: Path, hv: RecordingHypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = fabricate(cache, "a000000000000001", b"first")
    build.point_current(cache, first)
    accepted = commands.create(owner, name="first-start", template="linux-small")
    _interrupted(owner, accepted, hv)
    (runtime.runtime_dir(accepted.vm_id).root / runtime.LAUNCHED_IMAGE).unlink()
    monkeypatch.setattr(worker, "_configure_identity", lambda vm: None)

    assert reconcile._settle(VirtualMachine.objects.get(pk=accepted.vm_id), True) == "completed"

    vm = VirtualMachine.objects.get(pk=accepted.vm_id)
    assert vm.state == "running" and vm.image_id == ""
    snap_req = commands.snapshot(owner, vm, name="unpinned")
    run(snap_req)
    assert snap_req.snapshot is not None
    assert Snapshot.objects.get(pk=snap_req.snapshot.pk).state == "failed"


def test_a_guest_saved_while_ballooned_is_restored_and_cloned_with_all_its_memory(
    owner: Caller, cache: Path, hv: RecordingHypervisor
) -> None:
    """The balloon's target is part of the saved guest: the worker deflates it after the
    restore (the outcome says from what), and the row says not ballooned, CPU weight its own."""
    first = fabricate(cache, "a000000000000001", b"first")
    vm, snap = started_vm_with_snapshot(owner, cache, first)
    commands.record_pressure_action(
        vm.pk, "vm.ballooned", {"target_mib": 128, "before_mib": vm.memory_mib}
    )
    commands.record_pressure_action(vm.pk, "vm.cpu_lowered", {"weight": 10, "before": 100})
    hv.saved_balloon = 128  # as if the snapshot had been taken while ballooned

    accepted = commands.restore(owner, VirtualMachine.objects.get(pk=vm.pk), snap)
    vm = run(accepted)
    restored = outcome_of(accepted)
    assert restored.type == "vm.restored", restored.payload
    assert restored.payload["balloon_saved_mib"] == 128
    assert hv.balloons[runtime.runtime_dir(vm.pk).root] == vm.memory_mib
    assert (vm.balloon_target_mib, vm.ballooned_at, vm.cpu_weight, vm.cpu_lowered_at) == (
        None,
        None,
        None,
        None,
    )

    cloned = commands.clone(owner, snap, name="copy")
    copy = run(cloned)
    assert copy.state == "running", copy.last_error
    assert outcome_of(cloned).payload["balloon_saved_mib"] == 128
    assert hv.balloons[runtime.runtime_dir(copy.pk).root] == copy.memory_mib

    # A guest saved unballooned (or a VMM without a balloon device) is left as it is.
    hv.saved_balloon = None
    again = commands.restore(owner, VirtualMachine.objects.get(pk=vm.pk), snap)
    run(again)
    assert "balloon_saved_mib" not in outcome_of(again).payload
