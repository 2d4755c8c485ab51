"""On real guests, through the commands, the worker's handlers and the API: a fork of a VM gives N
VMs that hold what its tmpfs held, each with its own hostname and agent credential; a VM unused
past its idle policy is paused by the tick (reason idle) and the next exec through the API
resumes it (reason activity) and succeeds, while a VM its owner paused stays paused (409)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.utils import timezone
from django.utils.module_loading import import_string

from accounts.caller import Caller
from audit.models import Event
from vms import commands, enqueue, guest, idle, runtime, worker
from vms.agent import credentials
from vms.hypervisors import process
from vms.models import Snapshot, VirtualMachine

pytestmark = [pytest.mark.guest, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def owner_user(make_user: Any) -> Any:
    return make_user("operator")


@pytest.fixture
def owner(owner_user: Any) -> Caller:
    return Caller.for_user(owner_user, channel="api")


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Requests handed to the worker: run by the test, in this process."""
    requests: list[str] = []
    monkeypatch.setattr(enqueue, "request", lambda event_id: requests.append(str(event_id)))
    return requests


@pytest.fixture
def made(owner: Any, vm_dirs: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """VMs (and snapshots) made by a test, destroyed (deleted) at its end."""
    from vms import images

    image = images.ensure_built()
    monkeypatch.setenv("SANDBOX_IMAGE_DIR", str(image.directory))
    things: list[Any] = []
    yield things
    for vm in VirtualMachine.objects.exclude(state="destroyed"):
        worker.handle(commands.destroy(owner, vm).request.event_id)
    for snap in Snapshot.objects.filter(state="ready"):
        commands.delete_snapshot(owner, snap)
        worker.cleanup_snapshot(str(snap.pk))


def start_vm(owner: Any, name: str) -> VirtualMachine:
    accepted = commands.create(owner, name=name, template="linux-small")
    assert worker.handle(accepted.request.event_id) == "vm.started"
    return VirtualMachine.objects.get(pk=accepted.vm_id)


def run(owner: Any, vm: VirtualMachine, script: str) -> str:
    result = guest.run_exec(owner, vm, ["sh", "-c", script], timeout=30)
    assert result.exit_code == 0, result.stderr
    return result.stdout.decode().strip()


def test_a_fork_gives_n_vms_with_the_sources_tmpfs_each_its_own_hostname_and_credential(
    owner: Any, made: list[Any], asked: list[str]
) -> None:
    source = start_vm(owner, "fork-src")
    run(owner, source, "echo forked-$((6*7)) > /tmp/marker; grep -q ' /tmp tmpfs ' /proc/mounts")
    asked.clear()
    forked = commands.fork(owner, source, count=2)
    assert asked == [str(forked.request.event_id)]  # the snapshot first, alone
    assert worker.handle(forked.request.event_id) == "vm.snapshotted"
    restores = {str(a.request.event_id) for a in forked.vms}
    assert set(asked[1:]) == restores  # then every new VM's restore
    for event_id in asked[1:]:
        assert worker.handle(event_id) == "vm.restored"
    source.refresh_from_db()
    assert source.state == "running"
    names, creds = {source.hostname}, {credentials.for_vm(source.pk)}
    for accepted in forked.vms:
        vm = VirtualMachine.objects.get(pk=accepted.vm_id)
        assert vm.state == "running" and vm.source_snapshot_id == forked.snapshot.pk
        assert run(owner, vm, "cat /tmp/marker") == "forked-42"
        assert run(owner, vm, "hostname") == vm.hostname
        names.add(vm.hostname)
        creds.add(credentials.for_vm(vm.pk))
        rotated = Event.objects.get(aggregate_id=str(vm.pk), type="vm.agent_credential_rotated")
        assert rotated.payload["reason"] == "cloned"
    assert len(names) == 3 and len(creds) == 3 and None not in creds
    assert run(owner, source, "hostname") == source.hostname
    # The restores trusted the hashes the snapshot task had just computed, the files untouched;
    # once one is touched, a restore hashes them again and finds it.
    for accepted in forked.vms:
        steps = Event.objects.filter(
            type="vm.progress", causation_id=str(accepted.request.event_id)
        )
        assert "the fork's snapshot: files as hashed when taken" in [
            e.payload["message"] for e in steps
        ]
    snap = Snapshot.objects.get(pk=forked.snapshot.pk)
    assert worker.hashed_unchanged(snap)
    name = sorted(snap.manifest)[0]
    with (runtime.snapshot_dir(snap.pk) / name).open("ab") as fh:
        fh.write(b"x")
    assert not worker.hashed_unchanged(snap)
    assert worker.verify_snapshot(snap) == f"{name} fails its SHA-256 check"


def test_an_idle_vm_is_paused_and_the_next_exec_resumes_it_but_not_an_owners_pause(
    owner: Any,
    owner_user: Any,
    made: list[Any],
    asked: list[str],
    token_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import django_q.tasks

    # The cluster's part, in this process: the tick's run is carried out at once.
    monkeypatch.setattr(django_q.tasks, "async_task", lambda func, **kw: import_string(func)())
    monkeypatch.setattr(idle, "_enqueued_at", None)
    vm = start_vm(owner, "idle-guest")
    commands.set_idle(owner, vm, idle_timeout_s=1)
    idle.touch(vm.pk)
    asked.clear()
    time.sleep(1.2)  # unused past its policy
    idle.tick(timezone.now())
    pause = Event.objects.get(type="vm.pause_requested", aggregate_id=str(vm.pk))
    assert pause.payload["reason"] == "idle" and pause.payload["idle_s"] >= 1
    assert asked == [str(pause.event_id)]
    assert worker.handle(str(pause.event_id)) == "vm.paused"
    hv, rt = runtime.hypervisor(), runtime.runtime_dir(vm.pk)
    assert hv.info(rt).state.value == "paused"

    client = token_client(owner_user)
    answer = client.post(f"/api/v1/vms/{vm.pk}/exec/", {"argv": ["echo", "awake"]}, format="json")
    assert answer.status_code == 200, answer.content
    assert answer.json()["stdout"] == "awake\n"
    resume = Event.objects.get(type="vm.resume_requested", aggregate_id=str(vm.pk))
    assert resume.payload["reason"] == "activity" and resume.payload["for"] == "exec"
    assert (resume.actor_type, resume.actor_name) == ("system", "idle")
    resumed = Event.objects.get(type="vm.resumed", causation_id=str(resume.event_id))
    assert resumed.payload["reason"] == "activity"
    exec_request = Event.objects.get(type="vm.exec_requested", aggregate_id=str(vm.pk))
    assert resume.position < resumed.position < exec_request.position
    vm.refresh_from_db()
    assert (vm.state, vm.idle_paused) == ("running", False)
    assert hv.info(rt).state.value == "running"
    assert asked == [str(pause.event_id)]  # the resume was carried out inline, not by a worker

    # Paused by its owner: an exec is refused, and nothing resumes it.
    owner_pause = commands.pause(owner, vm)
    assert worker.handle(owner_pause.request.event_id) == "vm.paused"
    answer = client.post(f"/api/v1/vms/{vm.pk}/exec/", {"argv": ["true"]}, format="json")
    assert answer.status_code == 409, answer.content
    assert Event.objects.filter(type="vm.resume_requested", aggregate_id=str(vm.pk)).count() == 1
    assert hv.info(rt).state.value == "paused"


def test_an_idle_vm_with_the_disk_mode_is_suspended_to_disk_and_the_next_exec_restores_it(
    owner: Any,
    owner_user: Any,
    made: list[Any],
    asked: list[str],
    token_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import django_q.tasks

    from vms import capacity, reconcile

    monkeypatch.setattr(django_q.tasks, "async_task", lambda func, **kw: import_string(func)())
    monkeypatch.setattr(idle, "_enqueued_at", None)
    vm = start_vm(owner, "disk-idle")
    # A file in its tmpfs, and a process of its own that outlives the exec that started it.
    sleeper = run(
        owner,
        vm,
        "echo kept-$((6*7)) > /tmp/marker; grep -q ' /tmp tmpfs ' /proc/mounts; "
        "setsid sleep 100000 </dev/null >/dev/null 2>&1 & echo $!",
    )
    assert sleeper.isdigit()
    commands.set_idle(owner, vm, idle_timeout_s=1, idle_to_disk=True)
    hv, rt = runtime.hypervisor(), runtime.runtime_dir(vm.pk)
    vmm_pid = rt.pid()
    assert vmm_pid is not None
    vm.refresh_from_db()
    host = vm.host

    def committed() -> dict[str, int]:
        rows = {h["name"]: h["committed"] for h in capacity.report()["hosts"]}
        return rows.get(host, {"vcpus": 0, "memory_mib": 0})

    assert committed() == {"vcpus": vm.vcpus, "memory_mib": vm.memory_mib}
    idle.touch(vm.pk)
    asked.clear()
    time.sleep(1.2)  # unused past its policy
    idle.tick(timezone.now())
    pause = Event.objects.get(type="vm.pause_requested", aggregate_id=str(vm.pk))
    assert pause.payload["reason"] == "idle" and pause.payload["to_disk"] is True
    assert asked == [str(pause.event_id)]
    assert worker.handle(str(pause.event_id)) == "vm.paused"

    # Suspended: its state in a file under its data dir, no VMM, no host memory held.
    paused = Event.objects.get(type="vm.paused", causation_id=str(pause.event_id))
    assert paused.payload["to_disk"] is True and paused.payload["reason"] == "idle"
    assert paused.payload["idle_s"] >= 1 and len(paused.payload["sha256"]) == 64
    directory = runtime.suspend_dir(vm.pk)
    files = paused.payload["files"]
    assert paused.payload["size_bytes"] == sum(f["size"] for f in files.values()) > 0
    for name, entry in files.items():
        assert (directory / name).stat().st_size == entry["size"]
        assert runtime.sha256_file(directory / name) == entry["sha256"]
    assert not hv.is_alive(rt)
    assert process.process_cmdline(vmm_pid) is None  # its VMM process is gone (or a zombie)
    vm.refresh_from_db()
    assert (vm.state, vm.idle_paused, vm.suspended_to_disk) == ("paused", True, True)
    assert committed() == {"vcpus": 0, "memory_mib": 0}
    client = token_client(owner_user)
    shown = client.get(f"/api/v1/vms/{vm.pk}/").json()
    assert (shown["state"], shown["suspended_to_disk"]) == ("paused", True)
    # The reconciler (as after a host restart) finds no VMM, and that is no crash.
    assert reconcile.reconcile(startup=True)["crashed"] == 0
    vm.refresh_from_db()
    assert (vm.state, vm.suspended_to_disk) == ("paused", True)

    # The next exec restores it from the file and goes on: its tmpfs and its process are there.
    answer = client.post(
        f"/api/v1/vms/{vm.pk}/exec/",
        {"argv": ["sh", "-c", f"cat /tmp/marker; kill -0 {sleeper} && echo alive"]},
        format="json",
    )
    assert answer.status_code == 200, answer.content
    assert answer.json()["stdout"] == "kept-42\nalive\n"
    resume = Event.objects.get(type="vm.resume_requested", aggregate_id=str(vm.pk))
    assert resume.payload["reason"] == "activity" and resume.payload["for"] == "exec"
    resumed = Event.objects.get(type="vm.resumed", causation_id=str(resume.event_id))
    assert resumed.payload["reason"] == "activity" and resumed.payload["from_disk"] is True
    assert not directory.exists()  # the saved state goes after a good restore
    vm.refresh_from_db()
    assert (vm.state, vm.idle_paused, vm.suspended_to_disk) == ("running", False, False)
    assert hv.is_alive(rt) and hv.info(rt).state.value == "running"
    assert committed() == {"vcpus": vm.vcpus, "memory_mib": vm.memory_mib}
    assert asked == [str(pause.event_id)]  # restored inline, not by a worker
