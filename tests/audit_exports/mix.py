"""A realistic mix of events, recorded through the real command functions.

Accounts, roles, tokens and login security go through ``accounts.commands``; VM, network and
snapshot events through ``audit.store.append``. Reports work from events alone, so these VMs
are ones the VM read model does not know (no ``vm.created``, whose full spec belongs to the VM
lifecycle work): its inline projector skips events of unknown VMs, as it does after a reset.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from accounts import commands
from audit import store
from audit.actor import Actor
from audit.commands import sign_digest, verify_chain

SHELL = Actor.system(channel="shell", name="tests")
GUESSER_IP = "203.0.113.7"  # the source address of the mix's failed logins


@dataclass
class Mix:
    admin: Any
    auditor: Any
    operator: Any
    viewer: Any
    vm_ids: list[str] = field(default_factory=list)


def _vm_events(actor: Actor, vm_id: str, *, fail_start: bool) -> None:
    def add(event_type: str, data: dict[str, Any], aggregate: str = "vm", aid: str = "") -> None:
        store.append(aggregate, aid or vm_id, event_type, data, actor=actor)

    add("vm.create_requested", {"name": f"vm-{vm_id[:6]}", "vcpus": 1, "memory_mib": 256})
    add("vm.start_requested", {})
    add("vm.progress", {"step": "booting"})
    if fail_start:
        add("vm.start_failed", {"reason": "kernel not found"})
        return
    add("vm.started", {"pid": 4242})
    add("net.ip_leased", {"ip": "10.77.0.5"})
    add("net.port_forward_added", {"host_port": 2222, "guest_port": 22})
    add("vm.console_opened", {"session": "s1"})
    add("vm.console_closed", {"session": "s1", "bytes": 1200, "sha256": "ab" * 32})
    add("vm.file_uploaded", {"path": "/tmp/in.txt", "size": 12, "sha256": "cd" * 32})
    add("vm.exec_completed", {"argv": ["uname", "-a"], "exit_code": 0})
    add("vm.file_downloaded", {"path": "/tmp/out.txt", "size": 34, "sha256": "ef" * 32})
    snap = str(uuid.uuid4())
    add("vm.snapshot_requested", {"snapshot": snap[:8]})
    add("snapshot.created", {"vm": vm_id, "files": 2}, "snapshot", snap)
    add("vm.snapshotted", {"snapshot": snap})
    add("snapshot.verified", {"vm": vm_id}, "snapshot", snap)
    add("snapshot.corrupted", {"vm": vm_id, "file": "memory"}, "snapshot", snap)
    add("vm.crashed", {"reason": "VMM exited with signal 9"})
    add("vm.recovered", {})
    add("vm.stop_requested", {})
    add("vm.stopped", {})
    add("net.ip_released", {"ip": "10.77.0.5"})


def record_mix(make_user: Callable[..., Any], rounds: int = 1) -> Mix:
    admin = make_user("admin")
    auditor = make_user("auditor")
    operator = make_user("operator")
    viewer = make_user("viewer")
    mix = Mix(admin, auditor, operator, viewer)
    as_admin = Actor.for_user(admin, channel="api")
    as_operator = Actor.for_user(operator, channel="api")
    for r in range(rounds):
        extra = commands.create_user(
            as_admin, username=f"temp{r}-{uuid.uuid4().hex[:4]}", password=None, role="viewer"
        )
        commands.set_role(as_admin, extra, "admin")
        commands.set_role(as_admin, extra, "operator")
        commands.create_token(as_operator, operator, name=f"ci-{r}", expires_days=30)
        forever = commands.create_token(
            as_operator, operator, name=f"forever-{r}", expires_days=None
        )
        commands.revoke_token(as_operator, forever.token)
        commands.record_token_rejected(Actor.anonymous(), forever.token, "revoked")
        commands.record_login(Actor.for_user(auditor, channel="dashboard"), auditor)
        commands.record_logout(Actor.for_user(auditor, channel="dashboard"), auditor)
        target = commands.create_user(
            as_admin, username=f"target{r}-{uuid.uuid4().hex[:4]}", password=None, role="viewer"
        )
        guesser = Actor(
            kind="anonymous", username=target.username, channel="dashboard", source_ip=GUESSER_IP
        )
        for _ in range(5):
            commands.record_login_failure(guesser, target.username, "bad")
        commands.unlock(as_admin, target.username)
        commands.set_active(as_admin, extra, False)
        for i in range(2):
            vm_id = str(uuid.uuid4())
            mix.vm_ids.append(vm_id)
            _vm_events(as_operator, vm_id, fail_start=(i == 1))
        sign_digest(SHELL)
        verify_chain(Actor.for_user(auditor, channel="api"))
    return mix
