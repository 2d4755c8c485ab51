"""Per-VM guest agent credentials: made, kept encrypted, handed to the guest, rotated.

Every VM's agent wants a credential of its own in every request (docs/agent-protocol.md,
"Credentials"), so whatever can open a VM's agent socket on the host cannot drive the guest
without it. This module is the one place that knows where a VM's credential is:

- ``client_for_vm(vm)``: the client every part of the product opens a VM's agent with (worker,
  exec, files, console, health): it presents the VM's credential.
- ``give_fresh(vm, client, reason)``: "give this VM a fresh credential": hand the guest a new one
  (``enroll`` when it has none yet, ``rotate`` when ``client`` presents its current one), keep
  it, and record ``vm.agent_credential_rotated``. Used after a boot (enrolled), a restore in
  place (restored), a clone (cloned), on request (requested), and by a pool hand-out.
- ``connect(vm, timeout, enroll=True)``: the worker's hello, which enrolls a guest that booted
  afresh (a reboot forgets the credential: it lives in the guest's /run).

Values are kept in ``AgentCredential`` rows, encrypted under the secrets store's keyring
(``secretstore.crypto``), bound to their holder ("vm:<id>" or "snapshot:<id>"). A snapshot keeps
the credential its saved guest has, so a restore can greet the restored agent and at once rotate
it to the VM's own: the source's credential is refused by every clone. No value ever goes into an
event, a log line, an export or a snapshot's files.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from typing import Any

from django.db import transaction
from django.utils import timezone

from audit import store
from audit.actor import Actor
from secretstore import crypto
from vms import commands, runtime
from vms.agent.client import AgentClient, AgentError
from vms.models import AgentCredential, VirtualMachine

__all__ = [
    "client_for_vm",
    "connect",
    "for_snapshot",
    "for_vm",
    "forget_snapshot",
    "forget_vm",
    "give_fresh",
    "keep_fresh",
    "keep_new",
    "keep_for_snapshot",
    "new_credential",
    "reencrypt_all",
    "take_over",
]

log = logging.getLogger("sandbox.vms.credentials")


def new_credential() -> str:
    """256 random bits, URL-safe base64 (43 characters of the agent's alphabet)."""
    return secrets.token_urlsafe(32)


def _vm_holder(vm_id: object) -> str:
    return f"vm:{uuid.UUID(str(vm_id))}"


def _snapshot_holder(snapshot_id: object) -> str:
    return f"snapshot:{uuid.UUID(str(snapshot_id))}"


def _put(holder: str, value: str) -> str:
    """Store ``value`` for ``holder`` (replacing what it had); returns the key id."""
    row = AgentCredential(holder=holder)
    sealed = crypto.keyring().seal(value.encode(), row.aad)
    row.key_id, row.nonce, row.ciphertext = sealed.key_id, sealed.nonce, sealed.ciphertext
    row.created_at = timezone.now()
    # One statement (an upsert on the holder), where update_or_create took four.
    AgentCredential.objects.bulk_create(
        [row],
        update_conflicts=True,
        unique_fields=["holder"],
        update_fields=["key_id", "nonce", "ciphertext", "created_at"],
    )
    return sealed.key_id


def _get(holder: str) -> str | None:
    row = AgentCredential.objects.filter(holder=holder).first()
    if row is None:
        return None
    sealed = crypto.Sealed(row.key_id, bytes(row.nonce), bytes(row.ciphertext))
    return crypto.keyring().open(sealed, row.aad).decode()


def for_vm(vm_id: object) -> str | None:
    """The VM's credential, or None when it has none yet (never booted with one)."""
    return _get(_vm_holder(vm_id))


def for_snapshot(snapshot_id: object) -> str | None:
    """The credential the snapshot's saved guest has (None: taken before credentials)."""
    return _get(_snapshot_holder(snapshot_id))


def keep_for_snapshot(vm_id: object, snapshot_id: object) -> None:
    """The snapshot's guest has the VM's credential of now: keep a copy bound to the snapshot."""
    value = for_vm(vm_id)
    if value is not None:
        _put(_snapshot_holder(snapshot_id), value)


def forget_vm(vm_id: object) -> None:
    AgentCredential.objects.filter(holder=_vm_holder(vm_id)).delete()


def forget_snapshot(snapshot_id: object) -> None:
    AgentCredential.objects.filter(holder=_snapshot_holder(snapshot_id)).delete()


def client_for_vm(
    vm: VirtualMachine, *, connect_timeout: float = 5.0, timeout: float = 30.0
) -> AgentClient:
    """A client for the VM's agent that presents the VM's credential: the only way the product
    opens a VM's agent (call ``hello`` next)."""
    return AgentClient.from_hypervisor(
        runtime.hypervisor(),
        runtime.runtime_dir(vm.pk),
        connect_timeout=connect_timeout,
        timeout=timeout,
        credential=for_vm(vm.pk),
    )


def give_fresh(
    vm: VirtualMachine,
    client: AgentClient,
    reason: str,
    *,
    request: store.RecordedEvent | None = None,
    actor: Actor | None = None,
) -> None:
    """Give the VM a fresh credential through ``client`` (connected to its agent, presenting
    the guest's current credential, or None for a guest that has none yet: then it is
    enrolled), keep it, and record ``vm.agent_credential_rotated`` with ``reason``.

    The new value is stored in the same transaction as the event, and the guest is told
    inside it: if the guest refuses, nothing is stored and the old credential stays valid."""
    if reason not in commands.AGENT_CREDENTIAL_REASONS:
        raise ValueError(f"unknown reason {reason!r}")
    new = new_credential()
    with transaction.atomic():
        key_id = _put(_vm_holder(vm.pk), new)
        if client.credential is None:
            client.enroll(new)
        else:
            client.rotate(new)
        commands.record_agent_credential_rotated(
            str(vm.pk), reason, actor=actor, request=request, key_id=key_id
        )
    log.info("VM %s: agent credential %s", vm.pk, reason)


def connect(
    vm: VirtualMachine,
    timeout: float,
    *,
    enroll: bool = False,
    request: store.RecordedEvent | None = None,
    **options: Any,
) -> AgentClient:
    """The VM's agent, greeted with the VM's credential. With ``enroll`` (the worker only), a
    guest that answers it has no credential (it booted afresh: a cold start or a reboot) is
    given a fresh one first: trust on first use, by the worker, before anyone else is told the
    VM is up."""
    client = client_for_vm(vm, **options)
    try:
        try:
            client.hello(timeout=timeout)
        except AgentError as exc:
            if exc.code != "not_enrolled" or not enroll:
                raise
            client.credential = None
            give_fresh(vm, client, "enrolled", request=request)
            client.hello(timeout=timeout)
    except BaseException:
        client.close()
        raise
    return client


def take_over(
    vm: VirtualMachine,
    current: str | None,
    reason: str,
    *,
    request: store.RecordedEvent | None = None,
    timeout: float = 30.0,
) -> None:
    """A guest that was restored with someone else's credential (``current``: its template's,
    or its snapshot's) gets the VM's own at once, so the old one is refused from then on."""
    if current is None:
        raise AgentError(
            "no_credential",
            "no credential is kept for this guest's saved state (saved before agent "
            "credentials): it cannot be reached",
        )
    client = AgentClient.from_hypervisor(
        runtime.hypervisor(), runtime.runtime_dir(vm.pk), credential=current, timeout=timeout
    )
    with client:
        client.hello(timeout=timeout, interval=0.05)
        give_fresh(vm, client, reason, request=request)


def keep_new(vm_id: object) -> tuple[str, str]:
    """A fresh credential of ``vm_id``'s, kept (replacing its current one) but not given to its
    guest yet: (the value, its key id). The caller holds the transaction and hands the value to
    the guest (a ``rotate``) within it, and records the rotation (a pool hand-out:
    ``vms.pools``, in the same append as the VM's start)."""
    new = new_credential()
    return new, _put(_vm_holder(vm_id), new)


def keep_fresh(vm_id: object, client: AgentClient) -> str:
    """Hand the guest behind ``client`` (presenting its current credential) a fresh one of
    ``vm_id``'s and keep it; the key id. As ``keep_new``, the caller holds the transaction and
    records the rotation."""
    new, key_id = keep_new(vm_id)
    client.rotate(new)
    return key_id


def reencrypt_all() -> int:
    """Seal every stored credential again under the secrets keyring's current key (before a key
    is retired: a credential under a retired key could no longer be read, and its VM reached).
    The values, and so the guests, are unchanged. Returns how many rows were sealed again."""
    ring = crypto.keyring()
    done = 0
    for pk in AgentCredential.objects.exclude(key_id=ring.current_id).values_list("pk", flat=True):
        with transaction.atomic():
            row = AgentCredential.objects.select_for_update().filter(pk=pk).first()
            if row is None or row.key_id == ring.current_id:
                continue
            value = ring.open(
                crypto.Sealed(row.key_id, bytes(row.nonce), bytes(row.ciphertext)), row.aad
            )
            sealed = ring.seal(value, row.aad)
            row.key_id, row.nonce, row.ciphertext = sealed.key_id, sealed.nonce, sealed.ciphertext
            row.save(update_fields=["key_id", "nonce", "ciphertext"])
            done += 1
    return done
