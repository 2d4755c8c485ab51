"""How the host keeps agent credentials (``vms.agent.credentials``), without a guest: encrypted and
bound to their holder, copied to a snapshot, forgotten with it, sealed again under a new key; and
``give_fresh`` stores a new one and records it only when the guest took it."""

from __future__ import annotations

import base64
import os
import uuid
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from audit.models import Event
from secretstore import crypto
from vms import commands
from vms.agent import credentials
from vms.agent.client import AgentError
from vms.models import AgentCredential

pytestmark = pytest.mark.django_db


def key(name: str) -> str:
    return f"{name}:{base64.b64encode(os.urandom(32)).decode()}"


class FakeAgent:
    """What give_fresh needs of a client: the guest's answer to enroll or rotate."""

    def __init__(self, credential: str | None, refuse: bool = False) -> None:
        self.credential = credential
        self.refuse = refuse
        self.calls: list[str] = []

    def enroll(self, new: str) -> None:
        self._answer("enroll", new)

    def rotate(self, new: str) -> None:
        self._answer("rotate", new)

    def _answer(self, op: str, new: str) -> None:
        self.calls.append(op)
        if self.refuse:
            raise AgentError("unauthorized", "missing or wrong credential")
        self.credential = new


class FakeVM:
    def __init__(self) -> None:
        self.pk = uuid.uuid4()


def test_a_credential_is_stored_encrypted_and_bound_to_its_holder() -> None:
    vm, other = uuid.uuid4(), uuid.uuid4()
    credentials._put(f"vm:{vm}", "secret-value-of-the-test-0123456789-abcdefg")
    row = AgentCredential.objects.get(holder=f"vm:{vm}")
    assert b"secret-value" not in bytes(row.ciphertext)
    assert credentials.for_vm(vm) == "secret-value-of-the-test-0123456789-abcdefg"
    # The ciphertext copied onto another VM's row does not open there.
    AgentCredential.objects.create(
        holder=f"vm:{other}",
        key_id=row.key_id,
        nonce=row.nonce,
        ciphertext=row.ciphertext,
        created_at=row.created_at,
    )
    with pytest.raises(crypto.DecryptionFailed):
        credentials.for_vm(other)


def test_a_snapshot_keeps_the_vms_credential_and_forgets_it_with_itself() -> None:
    vm, snap = uuid.uuid4(), uuid.uuid4()
    assert credentials.for_snapshot(snap) is None
    credentials._put(f"vm:{vm}", "the-vms-credential-0123456789-abcdefghijklmn")
    credentials.keep_for_snapshot(vm, snap)
    assert credentials.for_snapshot(snap) == "the-vms-credential-0123456789-abcdefghijklmn"
    credentials.forget_snapshot(snap)
    credentials.forget_vm(vm)
    assert credentials.for_snapshot(snap) is None and credentials.for_vm(vm) is None


def test_credentials_are_sealed_again_under_a_new_key(settings: Any) -> None:
    old = key("old-1")
    settings.SANDBOX_SECRETS_KEYS = old
    vm = uuid.uuid4()
    credentials._put(f"vm:{vm}", "sealed-under-the-old-key-0123456789-abcdefg")
    settings.SANDBOX_SECRETS_KEYS = f"{key('new-2')},{old}"
    assert credentials.reencrypt_all() == 1
    assert AgentCredential.objects.get(holder=f"vm:{vm}").key_id == "new-2"
    settings.SANDBOX_SECRETS_KEYS = settings.SANDBOX_SECRETS_KEYS.split(",")[0]  # old retired
    assert credentials.for_vm(vm) == "sealed-under-the-old-key-0123456789-abcdefg"
    assert credentials.reencrypt_all() == 0


@pytest.mark.parametrize("current", [None, "the-guests-current-credential-0123456789-ab"])
def test_give_fresh_enrolls_or_rotates_stores_and_records_without_the_value(
    current: str | None,
) -> None:
    vm, agent = FakeVM(), FakeAgent(current)
    credentials.give_fresh(vm, agent, "requested")  # type: ignore[arg-type]
    assert agent.calls == ["enroll" if current is None else "rotate"]
    stored = credentials.for_vm(vm.pk)
    assert stored == agent.credential and stored != current and len(stored) >= 43
    event = Event.objects.get(aggregate_id=str(vm.pk), type="vm.agent_credential_rotated")
    assert event.payload == {"reason": "requested", "key_id": crypto.keyring().current_id}
    assert stored not in event.data


def test_a_guest_that_refuses_leaves_the_old_credential_and_no_event() -> None:
    vm = FakeVM()
    credentials._put(f"vm:{vm.pk}", "the-old-credential-still-valid-0123456789-ab")
    with pytest.raises(AgentError):
        credentials.give_fresh(vm, FakeAgent("whatever", refuse=True), "requested")  # type: ignore[arg-type]
    assert credentials.for_vm(vm.pk) == "the-old-credential-still-valid-0123456789-ab"
    assert not Event.objects.filter(aggregate_id=str(vm.pk)).exists()


def test_an_unknown_reason_is_refused_before_anything() -> None:
    with pytest.raises(ValueError, match="reason"):
        commands.record_agent_credential_rotated(str(uuid.uuid4()), "because")
    with pytest.raises(ValueError, match="reason"):
        credentials.give_fresh(FakeVM(), FakeAgent(None), "because")  # type: ignore[arg-type]


def test_the_rotate_command_refuses_what_is_not_a_vm() -> None:
    with pytest.raises(CommandError, match="not a VM id"):
        call_command("rotate_agent_credential", "../etc")
    with pytest.raises(CommandError, match="no VM"):
        call_command("rotate_agent_credential", str(uuid.uuid4()))
