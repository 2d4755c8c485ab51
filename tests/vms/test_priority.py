"""Priorities under host pressure against the projections (no guests): from the template or the
create, validated, changed by the owner with vm.priority_set, refused to others; the pressure
events fold into the VM's row and a rebuild gives the same; the tick enqueues a pass only when
there may be something to do."""

from __future__ import annotations

from typing import Any

import pytest
from django.utils import timezone

from accounts.caller import Caller
from audit import projections
from audit.models import Event
from vms import commands, pressure
from vms.models import Snapshot, Template, VirtualMachine

pytestmark = pytest.mark.django_db


def running_vm(caller: Any, name: str = "box", **create: Any) -> VirtualMachine:
    accepted = commands.create(caller, name=name, template="linux-small", **create)
    commands.record_outcome(accepted.request, "vm.started", {"host": "h1", "hypervisor": "qemu"})
    return VirtualMachine.objects.get(pk=accepted.vm_id)


def test_a_vm_takes_its_templates_priority_unless_the_create_gives_one(caller_for) -> None:
    Template.objects.filter(name="linux-small").update(priority="low", pressure_opt_out=True)
    caller = caller_for("operator")
    inherited = running_vm(caller, name="a")
    given = running_vm(caller, name="b", priority="high", pressure_opt_out=False)
    assert (inherited.priority, inherited.pressure_opt_out) == ("low", True)
    assert (given.priority, given.pressure_opt_out) == ("high", False)
    created = Event.objects.get(type="vm.created", aggregate_id=str(given.pk)).payload
    assert (created["priority"], created["pressure_opt_out"]) == ("high", False)


def test_the_api_sets_it_at_create_and_the_owner_changes_it(make_user, token_client) -> None:
    owner = make_user("operator")
    client = token_client(owner)
    made = client.post(
        "/api/v1/vms/", {"name": "api-box", "template": "linux-small", "priority": "low"}, "json"
    )
    assert made.status_code == 202, made.content
    vm = VirtualMachine.objects.get(name="api-box")
    shown = client.get(f"/api/v1/vms/{vm.pk}/").json()
    assert (shown["priority"], shown["pressure_opt_out"]) == ("low", False)
    assert shown["balloon_target_mib"] is None
    answer = client.post(f"/api/v1/vms/{vm.pk}/priority/", {"pressure_opt_out": True}, "json")
    assert answer.status_code == 200, answer.content
    body = answer.json()
    assert (body["priority"], body["pressure_opt_out"]) == ("low", True)
    assert body["before"] == {"priority": "low", "pressure_opt_out": False}
    event = Event.objects.get(position=body["event_position"])
    assert event.type == "vm.priority_set" and event.actor_name == owner.username
    vm.refresh_from_db()
    assert (vm.priority, vm.pressure_opt_out) == ("low", True)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "priority"),
        ({"priority": "urgent"}, "priority"),
        ({"pressure_opt_out": "maybe"}, "pressure_opt_out"),
    ],
)
def test_a_bad_priority_is_a_400_naming_its_field_and_changes_nothing(
    make_user, token_client, body, field
) -> None:
    owner = make_user("operator")
    vm = running_vm(Caller.for_user(owner, channel="api"))
    events = Event.objects.filter(aggregate_type="vm").count()
    answer = token_client(owner).post(f"/api/v1/vms/{vm.pk}/priority/", body, "json")
    assert answer.status_code == 400 and field in answer.json(), answer.content
    assert Event.objects.filter(aggregate_type="vm").count() == events
    if body:
        made = token_client(owner).post(
            "/api/v1/vms/", {"name": "n", "template": "linux-small", **body}, "json"
        )
        assert made.status_code == 400 and field in made.json(), made.content


def test_a_viewer_is_refused_and_anothers_vm_is_hidden(make_user, token_client) -> None:
    owner = make_user("operator")
    vm = running_vm(Caller.for_user(owner, channel="api"))
    url = f"/api/v1/vms/{vm.pk}/priority/"
    assert (
        token_client(make_user("viewer")).post(url, {"priority": "low"}, "json").status_code == 403
    )
    other = token_client(make_user("operator"))
    assert other.post(url, {"priority": "low"}, "json").status_code == 404
    assert not Event.objects.filter(type="vm.priority_set").exists()


def test_pressure_events_fold_into_the_row_and_a_rebuild_gives_the_same(caller_for) -> None:
    vm = running_vm(caller_for("operator"), priority="low")
    commands.record_pressure_action(vm.pk, "vm.ballooned", {"target_mib": 128, "before_mib": 256})
    commands.record_pressure_action(vm.pk, "vm.cpu_lowered", {"weight": 10, "before": 100})
    vm.refresh_from_db()
    assert (vm.state, vm.balloon_target_mib, vm.cpu_weight) == ("running", 128, 10)
    assert vm.ballooned_at is not None and vm.cpu_lowered_at is not None
    row = VirtualMachine.objects.values(
        "balloon_target_mib", "ballooned_at", "cpu_weight", "cpu_lowered_at", "priority"
    ).get(pk=vm.pk)
    projections.rebuild("vms.state")
    assert (
        VirtualMachine.objects.values(
            "balloon_target_mib", "ballooned_at", "cpu_weight", "cpu_lowered_at", "priority"
        ).get(pk=vm.pk)
        == row
    )
    stopped = commands.stop(caller_for("admin"), vm)
    commands.record_outcome(stopped.request, "vm.stopped", {})
    vm.refresh_from_db()
    assert (vm.balloon_target_mib, vm.cpu_weight) == (None, None)  # gone with its VMM
    with pytest.raises(ValueError, match="not a pressure event"):
        commands.record_pressure_action(vm.pk, "vm.started", {})


def _pressed(vm: VirtualMachine) -> None:
    commands.record_pressure_action(vm.pk, "vm.ballooned", {"target_mib": 128, "before_mib": 256})
    commands.record_pressure_action(vm.pk, "vm.cpu_lowered", {"weight": 10, "before": 100})


PRESSURE_FIELDS = ("balloon_target_mib", "ballooned_at", "cpu_weight", "cpu_lowered_at")


def test_a_new_vmm_restored_or_started_has_no_balloon_nor_lowered_cpu_weight(
    caller_for, monkeypatch
) -> None:
    """An in-place restore never leaves the VM stopped (its state holds the host throughout):
    vm.restored itself says the VMM is new; so does vm.started (after a failed restore)."""
    from vms import images

    monkeypatch.setattr(images, "snapshot_image", lambda image_id: None)  # no image cache here
    admin = caller_for("admin")
    vm = running_vm(caller_for("operator"), priority="low")
    taken = commands.snapshot(admin, vm, name="s")
    commands.record_snapshot_created(
        taken.request,
        taken.request.data["snapshot_id"],
        {"vm_id": str(vm.pk), "manifest": {}, "size_bytes": 1, "files": 0},
    )
    commands.record_outcome(taken.request, "vm.snapshotted", {})
    _pressed(vm)
    vm.refresh_from_db()
    assert vm.balloon_target_mib == 128 and vm.cpu_weight == 10
    snap = Snapshot.objects.get(pk=taken.snapshot.pk)
    restore = commands.restore(admin, vm, snap)
    commands.record_outcome(restore.request, "vm.restored", {"snapshot_id": str(snap.pk)})
    vm.refresh_from_db()
    assert vm.state == "running"
    assert [getattr(vm, f) for f in PRESSURE_FIELDS] == [None] * 4
    # A restore that failed after the old VMM went leaves it failed (its fields as they were:
    # the loop acts on running VMs only); the start that follows is a new VMM.
    _pressed(vm)
    failed = commands.restore(admin, vm, snap)
    commands.record_outcome(failed.request, "vm.restore_failed", {"reason": "x", "state": "failed"})
    vm.refresh_from_db()
    assert vm.state == "failed"
    started = commands.start(admin, vm)
    commands.record_outcome(started.request, "vm.started", {"host": "h1", "hypervisor": "qemu"})
    vm.refresh_from_db()
    assert vm.state == "running"
    assert [getattr(vm, f) for f in PRESSURE_FIELDS] == [None] * 4
    _pressed(vm)  # and a balloon of the new VMM is its own
    row = VirtualMachine.objects.values(*PRESSURE_FIELDS).get(pk=vm.pk)
    assert row["balloon_target_mib"] == 128
    projections.rebuild("vms.state")
    assert VirtualMachine.objects.values(*PRESSURE_FIELDS).get(pk=vm.pk) == row


def test_the_tick_enqueues_a_pass_only_when_there_is_something_to_do(
    caller_for, monkeypatch, settings
) -> None:
    import django_q.tasks

    monkeypatch.setattr("vms.runtime.host_name", lambda: "h1")
    enqueued: list[str] = []
    monkeypatch.setattr(django_q.tasks, "async_task", lambda func, **kw: enqueued.append(func))

    def look() -> None:
        monkeypatch.setattr(pressure, "_next_look", 0.0)
        pressure.tick(timezone.now())

    running_vm(caller_for("operator"), priority="high")
    settings.SANDBOX_PRESSURE_MEM_AVAILABLE_MIB = 10**9  # pressure, whatever the host has
    settings.SANDBOX_PRESSURE_RELEASE_AVAILABLE_MIB = 10**9
    look()
    assert enqueued == []  # only a high-priority VM: nothing to balloon
    running_vm(caller_for("operator"), name="low", priority="low")
    look()
    assert enqueued == ["vms.tasks.relieve_pressure"]
    settings.SANDBOX_PRESSURE_MEM_AVAILABLE_MIB = 0  # calm, nothing ballooned
    settings.SANDBOX_PRESSURE_RELEASE_AVAILABLE_MIB = 0
    settings.SANDBOX_PRESSURE_CPU_PSI = settings.SANDBOX_PRESSURE_RELEASE_CPU_PSI = 100.0
    look()
    assert enqueued == ["vms.tasks.relieve_pressure"]
    settings.SANDBOX_PRESSURE_ENABLED = False
    settings.SANDBOX_PRESSURE_MEM_AVAILABLE_MIB = 10**9
    settings.SANDBOX_PRESSURE_RELEASE_AVAILABLE_MIB = 10**9
    look()
    assert enqueued == ["vms.tasks.relieve_pressure"]


def test_the_vm_page_says_its_priority_and_what_the_host_took(caller_for, client) -> None:
    caller = caller_for("operator")
    vm = running_vm(caller, priority="low")
    commands.record_pressure_action(vm.pk, "vm.ballooned", {"target_mib": 128, "before_mib": 256})
    client.force_login(caller.user)
    page = client.get(f"/vms/{vm.pk}/").content.decode()
    assert "priority low; ballooned to 128 MiB" in page


# --- An action the log cannot take is undone (vms.pressure._relieve) ----------------------------


class FakeVMM:
    """A hypervisor double with a balloon and a CPU weight per VM (what QMP and the cgroup
    would say); ``fail_undo`` makes the next N calls that put a value back fail."""

    name = "fake"

    def __init__(self, memory: dict[Any, int]) -> None:
        self.memory, self.weight = dict(memory), dict.fromkeys(memory, 100)
        self.calls: list[tuple[str, Any, Any]] = []
        self.fail_undo = 0
        self.during_action: Any = None

    @staticmethod
    def _vm(rt: Any) -> Any:
        return next(k for k in ALL if str(k).replace("-", "")[:12] == rt.root.name)

    def balloon_mib(self, rt: Any) -> int:
        return self.memory[self._vm(rt)]

    def balloon(self, rt: Any, target: int) -> None:
        self._set("balloon", self.memory, rt, target)

    def set_cpu_weight(self, rt: Any, weight: int | None) -> int:
        before = self.weight[self._vm(rt)]
        self._set("cpu", self.weight, rt, weight or 100)
        return before

    def _set(self, what: str, values: dict[Any, int], rt: Any, value: int) -> None:
        from vms.hypervisors.base import HypervisorError

        vm_id = self._vm(rt)
        self.calls.append((what, vm_id, value))
        if len([c for c in self.calls if c[:2] == (what, vm_id)]) > 1 and self.fail_undo:
            self.fail_undo -= 1
            raise HypervisorError("QMP socket gone away")
        values[vm_id] = value


ALL: list[Any] = []


@pytest.fixture
def loop_host(monkeypatch, settings, tmp_path) -> None:
    monkeypatch.setattr("vms.runtime.host_name", lambda: "h1")
    settings.SANDBOX_RUNTIME_DIR = tmp_path
    monkeypatch.setattr(pressure, "_unrecorded", {}, raising=False)
    monkeypatch.setattr(pressure, "_cannot", {})
    settings.SANDBOX_PRESSURE_MEM_AVAILABLE_MIB = 1024
    settings.SANDBOX_PRESSURE_RELEASE_AVAILABLE_MIB = 2048
    settings.SANDBOX_PRESSURE_MEM_PSI = settings.SANDBOX_PRESSURE_RELEASE_PSI = 100.0
    settings.SANDBOX_PRESSURE_CPU_PSI, settings.SANDBOX_PRESSURE_RELEASE_CPU_PSI = 50.0, 20.0
    settings.SANDBOX_PRESSURE_BALLOON_FRACTION = 0.5
    settings.SANDBOX_PRESSURE_MIN_GUEST_MIB = 64


PRESSED = pressure.Readings(available_mib=500, memory_psi=0.0, cpu_psi=0.0)
CPU_PRESSED = pressure.Readings(available_mib=20000, memory_psi=0.0, cpu_psi=80.0)


def test_a_balloon_whose_event_meets_a_concurrent_append_is_undone(
    caller_for, monkeypatch, loop_host
) -> None:
    owner = caller_for("operator")
    vm = running_vm(owner, priority="low")
    ALL[:] = [vm.pk]
    hv = FakeVMM({vm.pk: vm.memory_mib})
    monkeypatch.setattr("vms.runtime.hypervisor", lambda: hv)
    # The owner opts the VM out between the loop's read of its version and the loop's append:
    # the loop's expected version is stale, and the real store refuses it.
    fresh, armed = commands._fresh, [True]

    def read_then_someone_appends(vm_id: Any) -> VirtualMachine:
        row = fresh(vm_id)
        if armed:
            armed.clear()
            commands.set_priority(owner, row, pressure_opt_out=True)
        return row

    monkeypatch.setattr(commands, "_fresh", read_then_someone_appends)
    assert pressure.relieve(PRESSED) == []
    full, half = vm.memory_mib, vm.memory_mib // 2
    assert hv.calls == [("balloon", vm.pk, half), ("balloon", vm.pk, full)]  # done, undone
    assert hv.memory[vm.pk] == full
    assert not Event.objects.filter(aggregate_id=str(vm.pk), type="vm.ballooned").exists()
    vm.refresh_from_db()
    assert vm.balloon_target_mib is None
    assert pressure._unrecorded == {}


def test_a_cpu_weight_unrecorded_is_undone_and_a_failed_undo_is_retried_next_pass(
    caller_for, monkeypatch, loop_host, tmp_path
) -> None:
    from audit import store
    from audit.errors import EventStoreUnavailable
    from vms import runtime

    vm = running_vm(caller_for("operator"), priority="low")
    ALL[:] = [vm.pk]
    rt = runtime.runtime_dir(vm.pk)
    rt.create()
    rt.pidfile.write_text("4242\n")  # the VMM the action was done to
    hv = FakeVMM({vm.pk: vm.memory_mib})
    hv.fail_undo = 1
    monkeypatch.setattr("vms.runtime.hypervisor", lambda: hv)
    append = store.append

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise EventStoreUnavailable("database is down")

    monkeypatch.setattr(store, "append", unavailable)
    assert pressure.relieve(CPU_PRESSED) == []
    assert hv.calls == [("cpu", vm.pk, 10), ("cpu", vm.pk, 100)]
    assert hv.weight[vm.pk] == 10  # the undo failed: still lowered, and known to be
    assert set(pressure._unrecorded) == {(vm.pk, "cpu")}
    # The next pass (the store back, the host still pressed) undoes it first and does not act
    # on it again in the same pass.
    monkeypatch.setattr(store, "append", append)
    assert pressure.relieve(CPU_PRESSED) == []
    assert hv.weight[vm.pk] == 100 and pressure._unrecorded == {}
    assert not Event.objects.filter(aggregate_id=str(vm.pk), type="vm.cpu_lowered").exists()
    # The pass after that acts and records as usual.
    done = pressure.relieve(CPU_PRESSED)
    assert [d["type"] for d in done] == ["vm.cpu_lowered"] and hv.weight[vm.pk] == 10
    vm.refresh_from_db()
    assert vm.cpu_weight == 10
