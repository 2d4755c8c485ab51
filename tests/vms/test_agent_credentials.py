"""On real guests, through the commands and the worker's handlers: each VM's agent wants the VM's
own credential. Without it, or with a wrong one, nothing is served; a requested rotation makes
the old one useless; a clone's agent refuses its source's credential and takes its own; and no
credential's value is ever in an event, a log line or a snapshot's metadata.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.management import call_command

from audit.models import Event
from vms import commands, guest, runtime, worker
from vms.agent import credentials
from vms.agent.client import AgentClient, AgentError
from vms.models import AgentCredential, Snapshot, VirtualMachine

pytestmark = [pytest.mark.guest, pytest.mark.django_db(transaction=True)]

ROTATED = "vm.agent_credential_rotated"


@pytest.fixture
def owner(caller_for: Any) -> Any:
    return caller_for("operator")


@pytest.fixture
def seen(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """Every credential value the test saw; at the end, none may be in the log or an event."""
    values: list[str] = []
    caplog.set_level(logging.DEBUG)
    yield values
    events = json.dumps(list(Event.objects.values_list("type", "data")))
    for value in values:
        assert value not in events
        assert value not in caplog.text
        for row in AgentCredential.objects.all():  # encrypted at rest
            assert value.encode() not in bytes(row.ciphertext)


@pytest.fixture
def made(owner: Any, vm_dirs: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """VMs (and snapshots) made by a test, destroyed (deleted) at its end."""
    from vms import images

    image = images.ensure_built()
    monkeypatch.setenv("SANDBOX_IMAGE_DIR", str(image.directory))
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        if isinstance(thing, Snapshot):
            snap = Snapshot.objects.get(pk=thing.pk)
            if snap.state != "deleted":
                commands.delete_snapshot(owner, snap)
                worker.cleanup_snapshot(str(snap.pk))
            continue
        vm = VirtualMachine.objects.get(pk=thing)
        if vm.state != "destroyed":
            worker.handle(commands.destroy(owner, vm).request.event_id)


def start_vm(owner: Any, made: list[Any], name: str) -> VirtualMachine:
    accepted = commands.create(owner, name=name, template="linux-small")
    made.append(accepted.vm_id)
    assert worker.handle(accepted.request.event_id) == "vm.started"
    return VirtualMachine.objects.get(pk=accepted.vm_id)


def agent_with(vm: VirtualMachine, credential: str | None) -> AgentClient:
    return AgentClient.from_hypervisor(
        runtime.hypervisor(), runtime.runtime_dir(vm.pk), credential=credential, timeout=15
    )


def refusal(vm: VirtualMachine, credential: str | None) -> str:
    with agent_with(vm, credential) as agent, pytest.raises(AgentError) as exc:
        agent.hello(timeout=15)
    return exc.value.code


def served(vm: VirtualMachine, credential: str) -> bool:
    with agent_with(vm, credential) as agent:
        agent.hello(timeout=15)
        return agent.exec(["true"], timeout=15).exit_code == 0


def rotations(vm_id: object) -> list[str]:
    return [
        e.payload["reason"]
        for e in Event.objects.filter(aggregate_id=str(vm_id), type=ROTATED).order_by("position")
    ]


def test_a_vm_agent_wants_its_credential_and_a_rotation_retires_the_old(
    owner: Any, made: list[Any], seen: list[str]
) -> None:
    vm = start_vm(owner, made, "cred-one")
    own = credentials.for_vm(vm.pk)
    assert own is not None
    seen.append(own)
    # It got its own at the start (from the template's, or enrolled after a cold boot).
    assert rotations(vm.pk) == ["enrolled"]
    assert refusal(vm, None) == "unauthorized"
    assert refusal(vm, "x" * 43) == "unauthorized"
    assert refusal(vm, own[:-1] + ("A" if own[-1] != "A" else "B")) == "unauthorized"
    assert served(vm, own)
    # The product's own paths present it (exec, files, health go through agent_session).
    with guest.agent_session(vm) as agent:
        assert agent.exec(["true"]).exit_code == 0

    call_command("rotate_agent_credential", str(vm.pk), stdout=io.StringIO())
    new = credentials.for_vm(vm.pk)
    assert new is not None and new != own
    seen.append(new)
    assert rotations(vm.pk) == ["enrolled", "requested"]
    event = Event.objects.filter(aggregate_id=str(vm.pk), type=ROTATED).last()
    assert event is not None and set(event.payload) == {"reason", "key_id"}
    assert (event.actor_type, event.channel) == ("system", "cli")
    assert refusal(vm, own) == "unauthorized"
    assert served(vm, new)
    with guest.agent_session(vm) as agent:
        assert agent.exec(["true"]).exit_code == 0
    # Nor in what the VMM and the guest wrote on this host (console log, VMM log).
    for path in runtime.runtime_dir(vm.pk).root.glob("*.log"):
        text = path.read_text(errors="replace")
        assert own not in text and new not in text


def test_a_clone_refuses_its_source_credential_and_takes_its_own(
    owner: Any, made: list[Any], seen: list[str]
) -> None:
    source = start_vm(owner, made, "cred-src")
    source_cred = credentials.for_vm(source.pk)
    assert source_cred is not None
    seen.append(source_cred)

    snap_req = commands.snapshot(owner, source, name="cred-snap")
    assert snap_req.snapshot is not None
    made.append(snap_req.snapshot)
    assert worker.handle(snap_req.request.event_id) == "vm.snapshotted"
    snap = Snapshot.objects.get(pk=snap_req.snapshot.pk)
    # The snapshot keeps (encrypted) the credential its saved guest has: its source's.
    assert credentials.for_snapshot(snap.pk) == source_cred
    for path in runtime.snapshot_dir(snap.pk).glob("*.json"):
        assert source_cred not in path.read_text()

    accepted = commands.clone(owner, snap, name="cred-clone")
    made.append(accepted.vm_id)
    assert worker.handle(accepted.request.event_id) == "vm.restored"
    clone = VirtualMachine.objects.get(pk=accepted.vm_id)
    clone_cred = credentials.for_vm(clone.pk)
    assert clone_cred is not None and clone_cred != source_cred
    seen.append(clone_cred)
    assert rotations(clone.pk) == ["cloned"]
    cloned = Event.objects.get(aggregate_id=str(clone.pk), type=ROTATED)
    assert cloned.causation_id == accepted.request.event_id

    assert refusal(clone, source_cred) == "unauthorized"  # the source's: refused by the clone
    assert served(clone, clone_cred)
    assert served(source, source_cred)  # the source keeps its own
    assert refusal(source, clone_cred) == "unauthorized"


def test_a_cold_booted_guest_is_enrolled_by_the_worker_before_it_is_running(
    owner: Any, made: list[Any], seen: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "_template_cache", lambda: None)  # no template: a cold boot
    vm = start_vm(owner, made, "cred-cold")
    started = Event.objects.get(aggregate_id=str(vm.pk), type="vm.started")
    assert started.payload["from_template"] is False
    own = credentials.for_vm(vm.pk)
    assert own is not None
    seen.append(own)
    enrolled = Event.objects.get(aggregate_id=str(vm.pk), type=ROTATED)
    assert enrolled.payload["reason"] == "enrolled"
    assert enrolled.position < started.position  # before anyone is told it runs
    with agent_with(vm, None) as intruder, pytest.raises(AgentError) as exc:
        intruder.enroll("an-intruders-credential-0123456789-abcdefgh")
    assert exc.value.code == "already_enrolled"
    assert refusal(vm, None) == "unauthorized"
    assert served(vm, own)
