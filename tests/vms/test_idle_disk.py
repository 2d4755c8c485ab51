"""The idle policy's disk mode against the projections and a stand-in driver (no guests): the
setting is validated and carried (templates, the API, forks); the system's idle pause of a VM
with it asks a suspend to disk, which saves the state under the VM's data dir, stops the VMM and
frees the VM's share of its host; only a resume, stop, restore or destroy is taken then; a
resume restores it and drops the file, a stop or destroy drops it too, and a corrupted file
leaves the VM suspended with the reason. The real guest: tests/vms/test_fork_idle_guest.py."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.utils import timezone

from audit.models import Event
from vms import capacity, commands, enqueue, lifecycle, reconcile, runtime, templates_config, worker
from vms.hypervisors.base import SnapshotFiles
from vms.models import HostCapacity, Template, VirtualMachine

pytestmark = pytest.mark.django_db


def running_vm(caller: Any, name: str = "sleepy") -> VirtualMachine:
    accepted = commands.create(caller, name=name, template="linux-small")
    commands.record_outcome(accepted.request, "vm.started", {"host": "h1", "hypervisor": "qemu"})
    return VirtualMachine.objects.get(pk=accepted.vm_id)


@pytest.fixture
def enqueued(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    asked: list[str] = []
    monkeypatch.setattr(enqueue, "request", lambda event_id: asked.append(str(event_id)))
    return asked


# --- The setting --------------------------------------------------------------------------------


def test_the_disk_mode_is_validated_and_set_with_the_policy(caller_for: Any) -> None:
    owner = caller_for("operator")
    vm = running_vm(owner)
    event = commands.set_idle(owner, vm, idle_timeout_s=30, idle_to_disk=True)
    assert event.data == {"idle_timeout_s": 30, "idle_to_disk": True}
    vm.refresh_from_db()
    assert (vm.idle_timeout_s, vm.idle_to_disk) == (30, True)
    for bad in ("yes", 1, None):
        with pytest.raises(ValidationError, match="true or false"):
            commands.set_idle(owner, vm, idle_timeout_s=30, idle_to_disk=bad)
    with pytest.raises(ValidationError, match="needs an idle_timeout_s"):
        commands.set_idle(owner, vm, idle_timeout_s=None, idle_to_disk=True)
    commands.set_idle(owner, vm, idle_timeout_s=None)  # cleared: the mode with it
    vm.refresh_from_db()
    assert (vm.idle_timeout_s, vm.idle_to_disk) == (None, False)


def test_the_api_takes_the_disk_mode_and_refuses_it_without_a_timeout(
    caller_for: Any, token_client: Any
) -> None:
    owner = caller_for("operator")
    vm = running_vm(owner)
    client = token_client(owner.user)
    url = f"/api/v1/vms/{vm.pk}/idle/"
    answer = client.post(url, {"idle_timeout_s": 60, "idle_to_disk": True}, format="json")
    assert answer.status_code == 200, answer.content
    assert (answer.json()["idle_timeout_s"], answer.json()["idle_to_disk"]) == (60, True)
    before = Event.objects.count()
    for body in (
        {"idle_timeout_s": None, "idle_to_disk": True},
        {"idle_timeout_s": 60, "idle_to_disk": "sometimes"},
    ):
        answer = client.post(url, body, format="json")
        assert answer.status_code == 400, answer.content
        assert "idle_to_disk" in answer.json()
    assert Event.objects.count() == before
    shown = client.get(f"/api/v1/vms/{vm.pk}/").json()
    assert (shown["idle_to_disk"], shown["suspended_to_disk"]) == (True, False)


def test_a_vm_takes_its_templates_disk_mode_and_forks_take_their_sources(
    caller_for: Any,
) -> None:
    Template.objects.filter(name="linux-small").update(idle_timeout_s=300, idle_to_disk=True)
    owner = caller_for("operator")
    vm = running_vm(owner)
    assert (vm.idle_timeout_s, vm.idle_to_disk) == (300, True)
    forked = commands.fork(owner, vm, count=1)
    assert forked.vms[0].vm.idle_to_disk is True


def test_a_templates_file_is_checked_for_the_disk_mode(tmp_path: Path) -> None:
    path = tmp_path / "templates.yaml"
    base = "name: t, boot: linux, vcpus: 1, memory_mib: 256"
    path.write_text(f"templates:\n  - {{{base}, idle_timeout_s: 60, idle_to_disk: true}}\n")
    assert templates_config.load_yaml(path)[0]["idle_to_disk"] is True
    for bad, message in (
        ("idle_timeout_s: 60, idle_to_disk: 'yes'", "idle_to_disk must be true or false"),
        ("idle_to_disk: true", "idle_to_disk needs an idle_timeout_s"),
    ):
        path.write_text(f"templates:\n  - {{{base}, {bad}}}\n")
        with pytest.raises(ImproperlyConfigured, match=message):
            templates_config.load_yaml(path)


# --- Suspend and resume, with a stand-in driver ---------------------------------------------------


class DiskHypervisor:
    """Saves two files as a snapshot; tracks whether its VMM runs and what was restored."""

    name = "fake"

    def __init__(self) -> None:
        self.alive = True
        self.restored: list[SnapshotFiles] = []

    def snapshot(self, rt: Any, directory: Path) -> SnapshotFiles:
        for name, body in (("state.bin", b"m" * 8192), ("snapshot.json", b"{}")):
            (directory / name).write_bytes(body)
        return SnapshotFiles(directory, (directory / "state.bin", directory / "snapshot.json"))

    def snapshot_nics(self, files: SnapshotFiles) -> int:
        return 0

    def restore(self, spec: Any, rt: Any, files: SnapshotFiles) -> int:
        assert all(Path(f).is_file() for f in files.files)
        self.restored.append(files)
        self.alive = True
        return 4242

    def is_alive(self, rt: Any) -> bool:
        return self.alive

    def destroy(self, rt: Any) -> None:
        self.alive = False

    def resume(self, rt: Any) -> None:
        pass

    def info(self, rt: Any) -> Any:
        return SimpleNamespace(state=SimpleNamespace(value="running" if self.alive else "dead"))


@pytest.fixture
def hv(vm_dirs: Any, monkeypatch: pytest.MonkeyPatch) -> DiskHypervisor:
    fake = DiskHypervisor()
    monkeypatch.setattr(runtime, "hypervisor", lambda: fake)
    monkeypatch.setattr(runtime, "launched_image", lambda rt: "img-1")
    monkeypatch.setattr(runtime, "record_launched_image", lambda rt, spec: "img-1")
    monkeypatch.setattr(
        runtime,
        "build_spec",
        lambda vm, image=None, nets=(): SimpleNamespace(extra={"image_id": "img-1"}),
    )
    monkeypatch.setattr(worker, "snapshot_image", lambda image_id: image_id)
    monkeypatch.setattr(worker, "_configure_identity", lambda vm, nic=True: None)
    monkeypatch.setattr(worker, "_ensure_data_disk", lambda vm: None)
    return fake


def suspended(owner: Any, name: str = "sleepy") -> VirtualMachine:
    vm = running_vm(owner, name)
    commands.set_idle(owner, vm, idle_timeout_s=60, idle_to_disk=True)
    pause = commands.pause_idle(vm.pk, timezone.now() + timedelta(seconds=61))
    assert pause is not None and pause.data["to_disk"] is True
    assert worker.handle(str(pause.event_id)) == "vm.paused"
    return VirtualMachine.objects.get(pk=vm.pk)


def test_the_idle_pause_with_the_disk_mode_saves_the_state_and_frees_the_host(
    caller_for: Any, hv: DiskHypervisor, enqueued: list[str]
) -> None:
    owner = caller_for("operator")
    plain = running_vm(owner, "plain")
    commands.set_idle(owner, plain, idle_timeout_s=60)
    pause = commands.pause_idle(plain.pk, timezone.now() + timedelta(seconds=61))
    assert pause is not None and "to_disk" not in pause.data  # the plain pause keeps its VMM

    HostCapacity.objects.create(host="h1", cpus=64, memory_mib=1 << 20, measured_at=timezone.now())
    vm = suspended(owner)
    assert (vm.state, vm.idle_paused, vm.suspended_to_disk) == ("paused", True, True)
    assert not hv.alive
    paused = Event.objects.get(type="vm.paused", aggregate_id=str(vm.pk))
    assert paused.payload["to_disk"] is True and paused.payload["reason"] == "idle"
    assert paused.payload["size_bytes"] == 8194
    assert set(paused.payload["files"]) == {"state.bin", "snapshot.json"}
    directory = runtime.suspend_dir(vm.pk)
    assert directory.parent == runtime.vm_data_dir(vm.pk)
    record = json.loads((directory / worker.SUSPEND_RECORD).read_text())
    assert record["manifest"] == paused.payload["files"] and record["image_id"] == "img-1"
    # It holds nothing on its host (the paused plain one does).
    host = {h["name"]: h for h in capacity.report()["hosts"]}["h1"]
    assert host["committed"] == {"vcpus": plain.vcpus, "memory_mib": plain.memory_mib}
    # The list and its page say so.
    from django.test import Client

    page = Client()
    page.force_login(owner.user)
    for url in ("/vms/", f"/vms/{vm.pk}/"):
        html = page.get(url).content.decode()
        assert html.count("(suspended to disk)") == 1, url


def test_only_a_resume_stop_restore_or_destroy_is_taken_while_on_disk(
    caller_for: Any, hv: DiskHypervisor, enqueued: list[str]
) -> None:
    owner = caller_for("operator")
    vm = suspended(owner)
    with pytest.raises(commands.SuspendedToDisk, match="suspended to disk"):
        commands.snapshot(owner, vm, name="nope")
    assert lifecycle.ON_DISK_VERBS == {"resume", "stop", "restore", "destroy"}
    assert all(lifecycle.verb(v).kind == "request" for v in lifecycle.ON_DISK_VERBS)
    assert lifecycle.stays_on_disk("paused") and not lifecycle.stays_on_disk("running")


def test_a_resume_restores_it_from_the_file_and_drops_the_file(
    caller_for: Any, hv: DiskHypervisor, enqueued: list[str]
) -> None:
    owner = caller_for("operator")
    vm = suspended(owner)
    directory = runtime.suspend_dir(vm.pk)
    resume = commands.resume(owner, vm)
    assert worker.handle(str(resume.request.event_id)) == "vm.resumed"
    resumed = Event.objects.get(type="vm.resumed", causation_id=str(resume.request.event_id))
    assert resumed.payload["from_disk"] is True and resumed.payload["pid"] == 4242
    assert [f.directory for f in hv.restored] == [directory]
    assert not directory.exists() and hv.alive
    vm.refresh_from_db()
    assert (vm.state, vm.suspended_to_disk) == ("running", False)


def test_a_corrupted_file_leaves_it_suspended_with_the_reason(
    caller_for: Any, hv: DiskHypervisor, enqueued: list[str]
) -> None:
    owner = caller_for("operator")
    vm = suspended(owner)
    state = runtime.suspend_dir(vm.pk) / "state.bin"
    state.write_bytes(b"x" * 8192)  # same size, other bytes
    resume = commands.resume(owner, vm)
    assert worker.handle(str(resume.request.event_id)).startswith("failed: ")
    failed = Event.objects.get(type="vm.resume_failed", causation_id=str(resume.request.event_id))
    assert "state.bin fails its SHA-256 check" in failed.payload["reason"]
    assert hv.restored == [] and state.is_file()
    vm.refresh_from_db()
    assert (vm.state, vm.suspended_to_disk) == ("paused", True)
    # A stop drops it: the next start is cold.
    stop = commands.stop(owner, vm)
    assert worker.handle(str(stop.request.event_id)) == "vm.stopped"
    stopped = Event.objects.get(type="vm.stopped", causation_id=str(stop.request.event_id))
    assert stopped.payload["suspended_state_removed"] is True
    assert not runtime.suspend_dir(vm.pk).exists()
    vm.refresh_from_db()
    assert (vm.state, vm.suspended_to_disk) == ("stopped", False)


def test_a_destroy_removes_the_file_and_the_reconciler_sees_no_crash(
    caller_for: Any, hv: DiskHypervisor, enqueued: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vms import vmnet

    monkeypatch.setattr(vmnet, "remove_orphans", lambda: {})
    owner = caller_for("operator")
    vm = suspended(owner)
    assert reconcile.reconcile(startup=True)["crashed"] == 0  # no VMM, and that is no crash
    vm.refresh_from_db()
    assert (vm.state, vm.suspended_to_disk) == ("paused", True)
    destroy = commands.destroy(owner, vm)
    assert worker.handle(str(destroy.request.event_id)) == "vm.destroyed"
    assert not runtime.suspend_dir(vm.pk).exists()
    vm.refresh_from_db()
    assert (vm.state, vm.suspended_to_disk) == ("destroyed", False)


def test_a_suspend_whose_worker_died_is_settled_from_what_it_left(
    caller_for: Any, hv: DiskHypervisor, enqueued: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vms import vmnet

    monkeypatch.setattr(vmnet, "remove_orphans", lambda: {})
    owner = caller_for("operator")
    saved, cut = running_vm(owner, "saved"), running_vm(owner, "cut")
    for vm in (saved, cut):
        commands.set_idle(owner, vm, idle_timeout_s=60, idle_to_disk=True)
        pause = commands.pause_idle(vm.pk, timezone.now() + timedelta(seconds=61))
        assert pause is not None and worker.claim(pause)
        if vm is saved:  # saved and its VMM stopped; the worker died before the outcome
            worker.suspend_to_disk(VirtualMachine.objects.get(pk=vm.pk), pause)
        else:  # died while saving: a partial file, no record
            runtime.suspend_dir(vm.pk).mkdir(parents=True)
            (runtime.suspend_dir(vm.pk) / "state.bin").write_bytes(b"partial")
    reconcile.reconcile(startup=True)
    saved.refresh_from_db()
    cut.refresh_from_db()
    assert (saved.state, saved.suspended_to_disk) == ("paused", True)
    done = Event.objects.get(type="vm.paused", aggregate_id=str(saved.pk))
    assert done.payload["to_disk"] is True and done.payload["recovered"] is True
    assert worker.suspended_complete(saved.pk)
    assert (cut.state, cut.suspended_to_disk) == ("crashed", False)
    assert Event.objects.filter(type="vm.pause_failed", aggregate_id=str(cut.pk)).exists()
    assert not runtime.suspend_dir(cut.pk).exists()
