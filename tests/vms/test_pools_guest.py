"""Warm pools on real guests (vms.pools): a hand-out runs as its own VM (hostname, credential),
the pool refills, concurrent creates never share a member, and a lower target evicts."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connection
from django.utils.module_loading import import_string

from audit.models import Event
from vms import commands, guest, identity, pools, runtime, worker
from vms.agent import credentials
from vms.agent.client import AgentClient, AgentError
from vms.hypervisors.templates import TemplateCache
from vms.models import PoolMember, VirtualMachine

pytestmark = [pytest.mark.guest, pytest.mark.django_db(transaction=True)]

TEMPLATE = "linux-small"


def _refill() -> dict[str, int]:
    return import_string("vms.tasks.refill_pools")()


def _destroy_all(owner: Any) -> None:
    for vm in VirtualMachine.objects.filter(owner=owner.user).exclude(state="destroyed"):
        accepted = commands.destroy(owner, vm)
        worker.handle(accepted.request.event_id)


def _member_secret(member_id: Any) -> str:
    value = credentials.for_vm(member_id)
    assert value
    return value


def _refused(vm_id: Any, credential: str) -> bool:
    client = AgentClient.from_hypervisor(
        runtime.hypervisor(), runtime.runtime_dir(vm_id), credential=credential, timeout=5
    )
    try:
        with client:
            client.hello(timeout=5, interval=0.05)
    except AgentError:
        return True
    return False


def test_a_hand_out_runs_as_its_own_vm_and_the_pool_refills(
    caller_for: Any, pool_env: list[str]
) -> None:
    admin, owner = caller_for("admin"), caller_for("operator")
    commands.set_pool_target(admin, TEMPLATE, 1)
    assert "vms.tasks.refill_pools" in pool_env  # a target change refills on commit
    try:
        assert _refill()["warmed"] == 1
        member = PoolMember.objects.get(template=TEMPLATE)
        assert (member.state, member.paused) == ("ready", True)
        assert runtime.hypervisor().info(runtime.runtime_dir(member.pk)).state.value == "paused"
        # The template's credential is refused by the member: it has one of its own.
        stand_in = pools._stand_in(
            member.pk,
            template=TEMPLATE,
            vcpus=member.vcpus,
            memory_mib=member.memory_mib,
            disk_mib=member.disk_mib,
        )
        cache = runtime.hypervisor().template_cache(worker.TEMPLATE_HOOKS)
        assert cache is not None
        snap = cache.lookup(runtime.build_spec(stand_in))
        assert snap is not None
        template_secret = TemplateCache.guest_secret(snap)
        member_secret = _member_secret(member.pk)

        accepted = pools.create(owner, name="from-the-pool", template=TEMPLATE)

        assert accepted.pooled is not None and accepted.vm_id == member.pk
        vm = VirtualMachine.objects.get(pk=accepted.vm_id)
        assert (vm.state, vm.owner_id, vm.name) == ("running", owner.user.pk, "from-the-pool")
        assert not PoolMember.objects.filter(pk=member.pk).exists()
        started = Event.objects.get(aggregate_id=str(vm.pk), type="vm.started")
        assert started.payload["from_pool"] is True and started.payload["handout_ms"]
        handed = Event.objects.get(aggregate_id=str(member.pk), type="pool.vm_handed_out")
        assert (
            handed.payload["vm_id"] == str(vm.pk) and handed.payload["owner"] == vm.owner.username
        )
        rotated = Event.objects.get(aggregate_id=str(vm.pk), type="vm.agent_credential_rotated")
        assert rotated.payload["reason"] == "handed_out"
        # It answers exec, with its own hostname.
        out = guest.run_exec(owner, vm, ["hostname"])
        assert out.exit_code == 0, out
        assert out.stdout.decode().strip() == identity.hostname_for("from-the-pool")
        # Neither the template's credential nor the member's of before reaches it.
        assert template_secret and _refused(vm.pk, template_secret)
        assert _refused(vm.pk, member_secret)
        # The hand-out asked for a refill, which warms a new member.
        assert "vms.tasks.refill_pools" in pool_env
        assert _refill()["warmed"] == 1
        fresh = PoolMember.objects.get(template=TEMPLATE)
        assert fresh.pk != vm.pk and fresh.state == "ready"
        # A lower target evicts, with an event, and the member's VMM goes.
        commands.set_pool_target(admin, TEMPLATE, 0)
        assert _refill()["evicted"] == 1
        evicted = Event.objects.get(aggregate_id=str(fresh.pk), type="pool.vm_evicted")
        assert evicted.payload["reason"] == "over the target"
        assert not runtime.hypervisor().is_alive(runtime.runtime_dir(fresh.pk))
        assert not worker.host_lock_path(fresh.pk).exists()  # nothing left per member
        assert not PoolMember.objects.exists()
    finally:
        commands.set_pool_target(admin, TEMPLATE, 0)
        _refill()
        _destroy_all(owner)


def test_concurrent_creates_never_share_a_pool_member(
    caller_for: Any, pool_env: list[str], postgres_only: None
) -> None:
    admin = caller_for("admin")
    owners = [caller_for("operator"), caller_for("operator"), caller_for("operator")]
    commands.set_pool_target(admin, TEMPLATE, 2)
    try:
        assert _refill()["warmed"] == 2
        members = set(PoolMember.objects.values_list("pk", flat=True))
        results: list[Any] = [None] * len(owners)
        go = threading.Barrier(len(owners))

        def create(i: int) -> None:
            try:
                go.wait()
                results[i] = pools.create(owners[i], name=f"racer-{i}", template=TEMPLATE)
            finally:
                connection.close()

        threads = [threading.Thread(target=create, args=(i,)) for i in range(len(owners))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        pooled = [r for r in results if r is not None and r.pooled is not None]
        # Two members, three creates: two hand-outs of two different members, one queued start.
        assert len(pooled) == 2
        assert {r.vm_id for r in pooled} == members
        assert sum(1 for r in results if r is not None and r.pooled is None) == 1
        assert not PoolMember.objects.filter(pk__in=members).exists()
        for r, owner in ((r, o) for r, o in zip(results, owners, strict=True) if r.pooled):
            vm = VirtualMachine.objects.get(pk=r.vm_id)
            assert vm.owner_id == owner.user.pk and vm.state == "running"
            out = guest.run_exec(owner, vm, ["hostname"])
            assert out.stdout.decode().strip() == identity.hostname_for(vm.name)
        handed = Event.objects.filter(type="pool.vm_handed_out").values_list("aggregate_id")
        assert sorted(a for (a,) in handed) == sorted(str(m) for m in members)
    finally:
        commands.set_pool_target(admin, TEMPLATE, 0)
        _refill()
        for owner in owners:
            _destroy_all(owner)


def test_a_hand_out_whose_start_is_not_recorded_is_undone_and_started_the_ordinary_way(
    caller_for: Any, pool_env: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start's outcome could not be appended (a conflict): the hand-out does not answer as
    if the VM ran. Its VMM goes, the member's eviction says why, no vm.started is recorded, and
    the start request goes to the worker (a template restore)."""
    admin, owner = caller_for("admin"), caller_for("operator")
    commands.set_pool_target(admin, TEMPLATE, 1)
    try:
        assert _refill()["warmed"] == 1
        member = PoolMember.objects.get(template=TEMPLATE)
        monkeypatch.setattr(commands, "record_handout", lambda request, key_id, data: None)
        pool_env.clear()
        accepted = pools.create(owner, name="not-recorded", template=TEMPLATE)
        assert accepted.pooled is None and accepted.vm_id == member.pk
        assert not runtime.hypervisor().is_alive(runtime.runtime_dir(member.pk))
        assert not Event.objects.filter(aggregate_id=str(member.pk), type="vm.started").exists()
        assert not Event.objects.filter(
            aggregate_id=str(member.pk), type="vm.agent_credential_rotated"
        ).exists()
        evicted = Event.objects.get(aggregate_id=str(member.pk), type="pool.vm_evicted")
        assert "could not be recorded" in evicted.payload["reason"]
        assert "vms.tasks.run_request" in pool_env
        assert VirtualMachine.objects.get(pk=member.pk).state == "starting"
    finally:
        monkeypatch.undo()
        commands.set_pool_target(admin, TEMPLATE, 0)
        _refill()
        _destroy_all(owner)


def test_a_create_that_does_not_commit_after_its_member_resumed_evicts_the_member(
    caller_for: Any, pool_env: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest's part of a hand-out begins as soon as the create takes the member, beside the
    create's appends. When the create then fails (here its append), no VM exists, and the
    member, whose guest may have run and got another credential, does not go back to the pool:
    its eviction says why and its VMM goes."""
    from audit import store

    admin, owner = caller_for("admin"), caller_for("operator")
    commands.set_pool_target(admin, TEMPLATE, 1)
    try:
        assert _refill()["warmed"] == 1
        member = PoolMember.objects.get(template=TEMPLATE)
        real_append_many = store.append_many
        failed: list[str] = []

        def failing_append(pending: Any, **kwargs: Any) -> Any:
            if any(p.type == "pool.vm_handed_out" for p in pending):
                failed.append(pending[0].aggregate_id)  # the guest's part is under way by now
                raise RuntimeError("the append failed")
            return real_append_many(pending, **kwargs)

        monkeypatch.setattr(store, "append_many", failing_append)
        with pytest.raises(RuntimeError, match="the append failed"):
            pools.create(owner, name="never-made", template=TEMPLATE)
        monkeypatch.undo()
        assert failed == [str(member.pk)]
        assert not VirtualMachine.objects.filter(pk=member.pk).exists()
        assert not PoolMember.objects.filter(pk=member.pk).exists()
        evicted = Event.objects.get(aggregate_id=str(member.pk), type="pool.vm_evicted")
        assert "the create was not recorded" in evicted.payload["reason"]
        assert not Event.objects.filter(type="pool.vm_handed_out").exists()
        assert not runtime.hypervisor().is_alive(runtime.runtime_dir(member.pk))
        assert credentials.for_vm(member.pk) is None  # its credential went with it
        assert "vms.tasks.refill_pools" in pool_env
    finally:
        monkeypatch.undo()
        commands.set_pool_target(admin, TEMPLATE, 0)
        _refill()
        _destroy_all(owner)


def test_a_hand_out_whose_guest_refuses_its_identity_starts_the_vm_the_ordinary_way(
    caller_for: Any, pool_env: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest's part fails (here the member's agent refuses the credential presented): the
    VM, created and committed, is not answered as running; the member is torn down and its
    eviction says why, and the VM's start request goes to the worker."""
    admin, owner = caller_for("admin"), caller_for("operator")
    commands.set_pool_target(admin, TEMPLATE, 1)
    try:
        assert _refill()["warmed"] == 1
        member = PoolMember.objects.get(template=TEMPLATE)
        monkeypatch.setattr(credentials, "for_vm", lambda vm_id: "not-the-member-credential")
        pool_env.clear()
        accepted = pools.create(owner, name="refused", template=TEMPLATE)
        monkeypatch.undo()
        assert accepted.pooled is None and accepted.vm_id == member.pk
        assert VirtualMachine.objects.get(pk=member.pk).state == "starting"
        assert not Event.objects.filter(aggregate_id=str(member.pk), type="vm.started").exists()
        evicted = Event.objects.get(aggregate_id=str(member.pk), type="pool.vm_evicted")
        assert "unauthorized" in evicted.payload["reason"], evicted.payload
        assert not runtime.hypervisor().is_alive(runtime.runtime_dir(member.pk))
        assert "vms.tasks.run_request" in pool_env
    finally:
        monkeypatch.undo()
        commands.set_pool_target(admin, TEMPLATE, 0)
        _refill()
        _destroy_all(owner)


def test_guests_restored_from_one_saved_state_do_not_share_random_numbers(
    caller_for: Any, pool_env: list[str]
) -> None:
    """Two pool members are restored from the template's one saved state, CRNG state included:
    the hand-out's configure carries fresh host entropy and the guest reseeds, so what each
    reads from /dev/urandom differs."""
    admin, owner = caller_for("admin"), caller_for("operator")
    commands.set_pool_target(admin, TEMPLATE, 2)
    try:
        assert _refill()["warmed"] == 2
        read = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
        seen = []
        for name in ("rng-a", "rng-b"):
            accepted = pools.create(owner, name=name, template=TEMPLATE)
            assert accepted.pooled is not None
            vm = VirtualMachine.objects.get(pk=accepted.vm_id)
            out = guest.run_exec(owner, vm, ["sh", "-c", read])
            assert out.exit_code == 0, out
            seen.append(out.stdout.decode())
        assert len(seen[0]) == 64 and seen[0] != seen[1]
    finally:
        commands.set_pool_target(admin, TEMPLATE, 0)
        _refill()
        _destroy_all(owner)
