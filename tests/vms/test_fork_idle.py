"""Fork and idle pause against the projections (no guests): a fork is checked whole (count,
state, quotas for all N) before anything is appended, then appends one snapshot request and N
new VMs whose restores wait for it; an idle policy is set by the owner, and the system pauses a
VM unused past it (reason idle), which the next guest request may wake, unlike an owner's pause."""

from __future__ import annotations

import os
import uuid
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.utils import timezone

from accounts.caller import Caller
from audit.models import Event
from vms import commands, enqueue, idle, worker
from vms.hypervisors.base import SnapshotFiles
from vms.models import Snapshot, Template, VirtualMachine, VMActivity
from vms.quotas import QuotaExceeded

pytestmark = pytest.mark.django_db


def vm_events() -> int:
    return Event.objects.filter(aggregate_type="vm").count()


def running_vm(caller: Any, name: str = "src") -> VirtualMachine:
    accepted = commands.create(caller, name=name, template="linux-small")
    commands.record_outcome(accepted.request, "vm.started", {"host": "h1", "hypervisor": "qemu"})
    return VirtualMachine.objects.get(pk=accepted.vm_id)


@pytest.fixture
def enqueued(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    asked: list[str] = []
    monkeypatch.setattr(enqueue, "request", lambda event_id: asked.append(str(event_id)))
    return asked


# --- Fork ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, -1, 11, True, "2", None])
def test_a_fork_count_outside_1_to_the_limit_is_refused_and_nothing_appended(
    caller_for: Any, count: Any
) -> None:
    owner = caller_for("operator")
    vm = running_vm(owner)
    before = vm_events()
    with pytest.raises(ValidationError) as exc:
        commands.fork(owner, vm, count=count)
    assert "count" in exc.value.message_dict
    assert vm_events() == before


def test_the_fork_limit_is_a_setting(caller_for: Any, settings: Any) -> None:
    settings.SANDBOX_FORK_MAX = 2
    owner = caller_for("operator")
    vm = running_vm(owner)
    with pytest.raises(ValidationError):
        commands.fork(owner, vm, count=3)
    assert len(commands.fork(owner, vm, count=2).vms) == 2


def test_a_fork_over_quota_for_all_n_creates_nothing(caller_for: Any, make_user: Any) -> None:
    owner = caller_for("operator")
    vm = running_vm(owner)
    admin = Caller.for_user(make_user("admin"))
    commands.set_quota(admin, user=owner.user, limits={"vms": 3})  # the source and 2 more
    before = (vm_events(), VirtualMachine.objects.count(), Snapshot.objects.count())
    with pytest.raises(QuotaExceeded) as exc:
        commands.fork(owner, vm, count=3)
    assert exc.value.quota == "vms"
    assert (vm_events(), VirtualMachine.objects.count(), Snapshot.objects.count()) == before
    assert len(commands.fork(owner, vm, count=2).vms) == 2


def test_only_a_running_vm_is_forked(caller_for: Any) -> None:
    owner = caller_for("operator")
    accepted = commands.create(owner, name="cold", template="linux-small", start_now=False)
    before = vm_events()
    with pytest.raises(commands.InvalidState):
        commands.fork(owner, accepted.vm, count=1)
    assert vm_events() == before


def test_a_viewer_and_another_operator_may_not_fork(caller_for: Any) -> None:
    owner = caller_for("operator")
    vm = running_vm(owner)
    for other in (caller_for("viewer"), caller_for("operator")):
        with pytest.raises(PermissionDenied):
            commands.fork(other, vm, count=1)


def test_names_are_one_per_vm_and_distinct(caller_for: Any) -> None:
    owner = caller_for("operator")
    vm = running_vm(owner)
    for names in (["a"], ["a", "a"], ["a", "b c"]):
        with pytest.raises(ValidationError):
            commands.fork(owner, vm, count=2, names=names)


def test_a_fork_appends_one_snapshot_request_and_n_vms_waiting_for_it(
    caller_for: Any, enqueued: list[str], django_capture_on_commit_callbacks: Any
) -> None:
    owner = caller_for("operator")
    vm = running_vm(owner)
    with django_capture_on_commit_callbacks(execute=True):
        forked = commands.fork(owner, vm, count=3)
    request = Event.objects.get(type="vm.snapshot_requested", aggregate_id=str(vm.pk))
    assert str(request.event_id) == str(forked.request.event_id)
    ids = [str(a.vm_id) for a in forked.vms]
    assert request.payload["fork"]["vm_ids"] == ids
    new = [VirtualMachine.objects.get(pk=i) for i in ids]
    assert [v.name for v in new] == ["src-fork-1", "src-fork-2", "src-fork-3"]
    assert len({v.hostname for v in new}) == len({v.mac for v in new}) == 3
    assert len({v.ip for v in new} | {vm.ip}) == 4
    for v, accepted in zip(new, forked.vms, strict=True):
        assert v.state == "restoring" and v.source_snapshot_id == forked.snapshot.pk
        restore = Event.objects.get(event_id=accepted.request.event_id)
        assert restore.type == "vm.restore_requested"
        assert restore.payload["fork_of"] == str(vm.pk) and restore.payload["clone"] is True
    # Only the snapshot is asked of the worker now; the restores follow it.
    assert enqueued == [str(forked.request.event_id)]
    # A second fork takes the next free names.
    vm.refresh_from_db()
    commands.record_outcome(forked.request, "vm.snapshot_failed", {"reason": "x"})
    again = commands.fork(owner, VirtualMachine.objects.get(pk=vm.pk), count=1)
    assert again.vms[0].vm.name == "src-fork-4"


def test_a_forks_restore_waits_for_its_snapshot_and_fails_on_its_own_when_it_failed(
    caller_for: Any, enqueued: list[str]
) -> None:
    owner = caller_for("operator")
    vm = running_vm(owner)
    forked = commands.fork(owner, vm, count=2)
    first, second = forked.vms
    # Delivered before the snapshot is taken: nothing is done, nothing claimed.
    assert worker.handle(str(first.request.event_id)) == "waiting for the fork's snapshot"
    assert not worker.is_claimed(first.request)
    # The snapshot fails: each new VM's restore fails with the reason.
    commands.record_outcome(
        forked.request,
        "vm.snapshot_failed",
        {"reason": "disk full", "state": "running", "snapshot_id": str(forked.snapshot.pk)},
    )
    assert worker.start_forks(forked.request) == 2
    assert set(enqueued) == {str(first.request.event_id), str(second.request.event_id)}
    for accepted in (first, second):
        assert worker.handle(str(accepted.request.event_id)).startswith("failed: ")
        failed = Event.objects.get(
            type="vm.restore_failed", causation_id=str(accepted.request.event_id)
        )
        assert "snapshot" in failed.payload["reason"]
        assert VirtualMachine.objects.get(pk=accepted.vm_id).state == "failed"
    assert VirtualMachine.objects.get(pk=vm.pk).state == "running"


class SnapshottingHypervisor:
    """Takes a snapshot of two files (what the worker's snapshot task asks of a driver)."""

    name = "fake"

    def info(self, rt: Any) -> Any:
        return SimpleNamespace(state=SimpleNamespace(value="running"))

    def snapshot(self, rt: Any, directory: Path) -> SnapshotFiles:
        for name, body in (("memory", b"m" * 4096), ("state.json", b"{}")):
            (directory / name).write_bytes(body)
        return SnapshotFiles(directory, (directory / "memory", directory / "state.json"))

    def resume(self, rt: Any) -> None:
        pass

    def is_alive(self, rt: Any) -> bool:
        return True


def forked_snapshot(owner: Any, vm: VirtualMachine) -> tuple[Any, Snapshot]:
    forked = commands.fork(owner, VirtualMachine.objects.get(pk=vm.pk), count=1)
    assert worker.handle(str(forked.request.event_id)) == "vm.snapshotted"
    return forked, Snapshot.objects.get(pk=forked.snapshot.pk)


def test_a_forks_restore_trusts_only_files_unchanged_while_they_were_hashed(
    caller_for: Any, vm_dirs: Any, enqueued: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vms import runtime

    monkeypatch.setattr(runtime, "hypervisor", SnapshottingHypervisor)
    monkeypatch.setattr(runtime, "launched_image", lambda rt: "img-1")
    owner = caller_for("operator")
    vm = running_vm(owner)
    # A file written to after its hash was taken, before the snapshot task is done with it.
    real = runtime.sha256_file

    def hash_then_write(path: Path, *args: Any) -> str:
        digest = real(path, *args)
        if path.name == "memory":
            written = path.stat().st_mtime_ns + 1_000_000_000
            with path.open("r+b") as fh:
                fh.write(b"X")  # same size: only the content differs
            # Its mtime as a write a moment later gives it (not the same filesystem tick).
            os.utime(path, ns=(written, written))
        return digest

    monkeypatch.setattr(runtime, "sha256_file", hash_then_write)
    forked, snap = forked_snapshot(owner, vm)
    monkeypatch.setattr(runtime, "sha256_file", real)
    assert not worker.hashed_unchanged(snap)
    restore = forked.vms[0].request
    assert worker.handle(str(restore.event_id)).startswith("failed: ")
    failed = Event.objects.get(type="vm.restore_failed", causation_id=str(restore.event_id))
    assert "memory fails its SHA-256 check" in failed.payload["reason"]
    steps = [
        e.payload["message"]
        for e in Event.objects.filter(type="vm.progress", causation_id=str(restore.event_id))
    ]
    assert "checking the snapshot's SHA-256 manifest" in steps
    assert Snapshot.objects.get(pk=snap.pk).state == "corrupted"

    # Untouched: trusted; what vouches for the files is kept outside their directory, 0600.
    _, snap = forked_snapshot(owner, vm)
    assert worker.hashed_unchanged(snap)
    kept = [p for p in runtime.snapshot_dir(snap.pk).iterdir()]
    assert sorted(p.name for p in kept) == ["memory", "state.json"]
    record = worker._hashed_path(snap.pk)
    assert record.is_file() and (record.stat().st_mode & 0o777) == 0o600
    assert not record.is_relative_to(runtime.snapshot_dir(snap.pk))


# --- Idle pause ---------------------------------------------------------------------------------


def test_the_owner_sets_and_clears_the_idle_policy(caller_for: Any) -> None:
    owner = caller_for("operator")
    vm = running_vm(owner)
    event = commands.set_idle(owner, vm, idle_timeout_s=30)
    assert event.type == "vm.idle_policy_set"
    assert event.data == {"idle_timeout_s": 30, "idle_to_disk": False}
    vm.refresh_from_db()
    assert vm.idle_timeout_s == 30
    commands.set_idle(owner, vm, idle_timeout_s=None)
    vm.refresh_from_db()
    assert vm.idle_timeout_s is None
    with pytest.raises(PermissionDenied):
        commands.set_idle(caller_for("operator"), vm, idle_timeout_s=30)
    before = vm_events()
    for bad in (0, -5, 1.5, True, "30", 10**9):
        with pytest.raises(ValidationError):
            commands.set_idle(owner, vm, idle_timeout_s=bad)
    assert vm_events() == before


def test_a_vm_takes_its_templates_idle_policy_and_forks_take_their_sources(
    caller_for: Any, enqueued: list[str]
) -> None:
    Template.objects.filter(name="linux-small").update(idle_timeout_s=300)
    owner = caller_for("operator")
    vm = running_vm(owner)
    assert vm.idle_timeout_s == 300
    commands.set_idle(owner, vm, idle_timeout_s=45)
    forked = commands.fork(owner, VirtualMachine.objects.get(pk=vm.pk), count=1)
    assert forked.vms[0].vm.idle_timeout_s == 45


def test_the_tick_pauses_a_vm_unused_past_its_policy_once_with_the_reason(
    caller_for: Any, enqueued: list[str], django_capture_on_commit_callbacks: Any
) -> None:
    owner = caller_for("operator")
    vm = running_vm(owner)
    quiet = running_vm(owner, name="no-policy")
    commands.set_idle(owner, vm, idle_timeout_s=60)
    now = timezone.now()
    idle.touch(vm.pk, now)
    assert idle.due(now + timedelta(seconds=59)) == []
    with django_capture_on_commit_callbacks(execute=True):
        assert idle.pause_idle_vms(now + timedelta(seconds=61)) == 1
    pause = Event.objects.get(type="vm.pause_requested", aggregate_id=str(vm.pk))
    assert pause.payload["reason"] == "idle" and pause.payload["idle_timeout_s"] == 60
    assert pause.payload["idle_s"] >= 60
    assert (pause.actor_type, pause.actor_name) == ("system", "idle")
    assert enqueued == [str(pause.event_id)]
    # Asked once: busy now, and paused after.
    assert idle.pause_idle_vms(now + timedelta(seconds=120)) == 0
    commands.record_outcome(pause_event(pause), "vm.paused", {})
    assert idle.pause_idle_vms(now + timedelta(seconds=120)) == 0
    vm.refresh_from_db()
    assert (vm.state, vm.idle_paused) == ("paused", True)
    assert not Event.objects.filter(type="vm.pause_requested", aggregate_id=str(quiet.pk)).exists()


def pause_event(row: Event) -> Any:
    return worker.load_request(str(row.event_id))


def test_use_delays_the_idle_pause(caller_for: Any) -> None:
    owner = caller_for("operator")
    vm = running_vm(owner)
    commands.set_idle(owner, vm, idle_timeout_s=60)
    now = timezone.now()
    idle.touch(vm.pk, now + timedelta(seconds=50))
    assert idle.due(now + timedelta(seconds=100)) == []
    assert [pk for pk, _ in idle.due(now + timedelta(seconds=111))] == [vm.pk]
    assert VMActivity.objects.filter(vm_id=vm.pk).count() == 1


def test_console_input_marks_use_at_most_once_per_interval(caller_for: Any) -> None:
    vm_id = uuid.uuid4()
    assert idle.touch_throttled(vm_id) is True
    assert idle.touch_throttled(vm_id) is False
    assert VMActivity.objects.filter(vm_id=vm_id).exists()


def test_guest_access_may_wake_an_idle_pause_but_not_an_owners_pause(caller_for: Any) -> None:
    owner = caller_for("operator")
    by_owner = running_vm(owner, name="owner-paused")
    request = commands.pause(owner, by_owner).request
    commands.record_outcome(request, "vm.paused", {})
    by_owner.refresh_from_db()
    assert (by_owner.state, by_owner.idle_paused) == ("paused", False)
    with pytest.raises(commands.InvalidState):
        commands.require_guest_access(owner, by_owner, "exec")
    assert commands.request_activity_resume(owner, by_owner, "exec", claimed_by="t") is None

    sleepy = running_vm(owner, name="idle-paused")
    commands.set_idle(owner, sleepy, idle_timeout_s=1)
    later = timezone.now() + timedelta(seconds=5)
    pause = commands.pause_idle(sleepy.pk, later)
    assert pause is not None
    commands.record_outcome(pause, "vm.paused", {})
    sleepy.refresh_from_db()
    commands.require_guest_access(owner, sleepy, "exec")  # allowed: it will be woken
    with pytest.raises(PermissionDenied):
        commands.require_guest_access(caller_for("operator"), sleepy, "exec")
    resume = commands.request_activity_resume(owner, sleepy, "exec", claimed_by="t")
    assert resume is not None and resume.type == "vm.resume_requested"
    assert resume.data["reason"] == "activity" and resume.data["for"] == "exec"
    assert worker.is_claimed(resume)  # claimed: no worker carries it out too
    sleepy.refresh_from_db()
    assert sleepy.state == "resuming"


def test_no_idle_pause_while_a_guest_request_runs_and_idleness_counts_from_its_end(
    caller_for: Any, enqueued: list[str]
) -> None:
    owner = caller_for("operator")
    vm = running_vm(owner)
    commands.set_idle(owner, vm, idle_timeout_s=60)
    idle.touch(vm.pk)
    request = commands.request_guest_access(owner, vm, "exec", {"argv": ["make"]})
    now = timezone.now() + timedelta(seconds=300)  # `make` still runs 5 minutes later
    assert [pk for pk, _ in idle.due(now)] == [vm.pk]  # its use dates from when it was asked
    assert idle.pause_idle_vms(now) == 0
    assert not Event.objects.filter(type="vm.pause_requested", aggregate_id=str(vm.pk)).exists()
    assert commands.guest_request_in_flight(vm.pk, now)
    # Its outcome marks the VM used: the idle time counts from the end of the command.
    done = commands.record_guest_outcome(owner, request, "vm.exec_completed", {"exit_code": 0})
    assert not commands.guest_request_in_flight(vm.pk, now)
    assert VMActivity.objects.get(vm_id=vm.pk).last_at == done.recorded_at
    assert idle.pause_idle_vms(done.recorded_at + timedelta(seconds=59)) == 0
    assert idle.pause_idle_vms(done.recorded_at + timedelta(seconds=61)) == 1
    pause = Event.objects.get(type="vm.pause_requested", aggregate_id=str(vm.pk))
    assert pause.payload["idle_s"] == 61.0


def test_the_idle_pause_is_decided_and_measured_from_the_use_seen_under_the_lock(
    caller_for: Any, enqueued: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = caller_for("operator")
    used, late = running_vm(owner, name="used"), running_vm(owner, name="late")
    for vm in (used, late):
        commands.set_idle(owner, vm, idle_timeout_s=60)
    now = timezone.now() + timedelta(seconds=300)  # unused for 5 minutes
    found = idle.due

    def due_then_used(when: Any, limit: int = idle.BATCH) -> Any:
        # Between the tick's look and the pause: one VM is used now, the other 90 s ago.
        out = found(when, limit)
        idle.touch(used.pk, when)
        idle.touch(late.pk, when - timedelta(seconds=90))
        return out

    monkeypatch.setattr(idle, "due", due_then_used)
    assert idle.pause_idle_vms(now) == 1
    assert not Event.objects.filter(type="vm.pause_requested", aggregate_id=str(used.pk)).exists()
    pause = Event.objects.get(type="vm.pause_requested", aggregate_id=str(late.pk))
    assert pause.payload["idle_s"] == 90.0  # not the 300 s the tick had seen


class FakeHypervisor:
    name = "fake"

    def __init__(self) -> None:
        self.resumed: list[Any] = []

    def resume(self, rt: Any) -> None:
        self.resumed.append(rt)


def test_a_guest_request_during_a_pending_idle_pause_waits_for_it_then_resumes(
    caller_for: Any, vm_dirs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vms import guest, runtime

    owner = caller_for("operator")
    vm = running_vm(owner)
    commands.set_idle(owner, vm, idle_timeout_s=1)
    stale = VirtualMachine.objects.get(pk=vm.pk)  # read by the view before the pause
    assert idle.pause_idle_vms(timezone.now() + timedelta(seconds=5)) == 1
    pause = pause_event(Event.objects.get(type="vm.pause_requested", aggregate_id=str(vm.pk)))
    hv = FakeHypervisor()
    monkeypatch.setattr(runtime, "hypervisor", lambda: hv)
    waits: list[float] = []

    def the_worker_pauses_it(seconds: float) -> None:
        # While the request waits, the worker carries out the pause.
        if not waits:
            commands.record_outcome(pause, "vm.paused", {})
        waits.append(seconds)

    monkeypatch.setattr(idle.time, "sleep", the_worker_pauses_it)
    woken, request = guest._asked(owner, stale, "exec", {"argv": ["true"]})
    assert waits and hv.resumed == [runtime.runtime_dir(vm.pk)]
    resume = Event.objects.get(type="vm.resume_requested", aggregate_id=str(vm.pk))
    assert resume.payload["reason"] == "activity"
    resumed = Event.objects.get(type="vm.resumed", causation_id=str(resume.event_id))
    assert pause.position < resume.position < resumed.position < request.position
    assert request.type == "vm.exec_requested"
    assert (woken.state, woken.idle_paused) == ("running", False)


def test_a_destroyed_vms_last_use_goes_with_it(caller_for: Any) -> None:
    owner = caller_for("operator")
    vm = running_vm(owner)
    request = commands.request_guest_access(owner, vm, "exec", {"argv": ["sleep", "60"]})
    # The request marked it used, in its own transaction.
    assert VMActivity.objects.filter(vm_id=vm.pk).exists() is True
    destroy = commands.destroy(owner, VirtualMachine.objects.get(pk=vm.pk)).request
    commands.record_outcome(destroy, "vm.destroyed", {})
    assert not VMActivity.objects.filter(vm_id=vm.pk).exists()
    # The outcome of an exec that ran through the destroy does not write it again.
    commands.record_guest_outcome(owner, request, "vm.exec_failed", {"reason": "gone"})
    assert not VMActivity.objects.filter(vm_id=vm.pk).exists()


# --- The API --------------------------------------------------------------------------------------


def test_fork_and_idle_through_the_api(
    make_user: Any, token_client: Any, enqueued: list[str]
) -> None:
    user = make_user("operator")
    owner = Caller.for_user(user, channel="api")
    vm = running_vm(owner)
    client = token_client(user)
    answer = client.post(f"/api/v1/vms/{vm.pk}/fork/", {"count": 2}, format="json")
    assert answer.status_code == 202, answer.content
    body = answer.json()
    assert body["status_url"] == f"/api/v1/requests/{body['request']['event_id']}/"
    assert [v["name"] for v in body["vms"]] == ["src-fork-1", "src-fork-2"]
    assert body["snapshot"]["id"]
    for bad in ({"count": 0}, {"count": 11}, {}, {"count": 2, "names": ["x"]}):
        before = vm_events()
        answer = client.post(f"/api/v1/vms/{vm.pk}/fork/", bad, format="json")
        assert answer.status_code == 400, (bad, answer.content)
        assert vm_events() == before
    answer = client.post(f"/api/v1/vms/{vm.pk}/idle/", {"idle_timeout_s": 30}, format="json")
    assert answer.status_code == 200 and answer.json()["idle_timeout_s"] == 30
    assert client.get(f"/api/v1/vms/{vm.pk}/").json()["idle_timeout_s"] == 30
    answer = client.post(f"/api/v1/vms/{vm.pk}/idle/", {"idle_timeout_s": None}, format="json")
    assert answer.status_code == 200 and answer.json()["idle_timeout_s"] is None
    assert (
        client.post(f"/api/v1/vms/{vm.pk}/idle/", {"idle_timeout_s": 0}, format="json").status_code
        == 400
    )


def test_a_forks_vms_fail_when_a_destroy_of_the_source_overtakes_its_snapshot(
    caller_for: Any, enqueued: list[str]
) -> None:
    owner = caller_for("operator")
    vm = running_vm(owner)
    forked = commands.fork(owner, vm, count=1)
    commands.destroy(owner, VirtualMachine.objects.get(pk=vm.pk))
    assert worker.handle(forked.request.event_id) == "superseded"
    assert enqueued == [str(forked.vms[0].request.event_id)]  # the restore goes on, and fails
    assert worker.handle(enqueued[0]).startswith("failed: ")
    failed = Event.objects.get(type="vm.restore_failed", causation_id=enqueued[0])
    assert "was not taken" in failed.payload["reason"]
    assert VirtualMachine.objects.get(pk=forked.vms[0].vm_id).state == "failed"
