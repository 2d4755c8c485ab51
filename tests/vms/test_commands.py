"""VM commands against the projections: state rules, quotas, outcomes, rebuilds (no guests)."""

from __future__ import annotations

import threading

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import connections

from accounts import commands as account_commands
from audit import projections
from audit.models import Event
from vms import commands, policy, quotas
from vms.models import Quota, RequestOutcome, Snapshot, Usage, VirtualMachine
from vms.quotas import QuotaExceeded

pytestmark = pytest.mark.django_db


def settle(result: commands.Accepted, outcome: str, **data) -> None:
    """Stand in for the worker: append the outcome of a request."""
    assert commands.record_outcome(result.request, outcome, data) is not None


def running_vm(caller, name="box") -> VirtualMachine:
    accepted = commands.create(caller, name=name, template="linux-small")
    settle(accepted, "vm.started", host="h1", hypervisor="qemu")
    return VirtualMachine.objects.get(pk=accepted.vm.pk)


def test_create_appends_the_definition_and_a_start_request(caller_for) -> None:
    caller = caller_for("operator")
    accepted = commands.create(caller, name="web-1", template="linux-small")
    vm = accepted.vm
    assert (vm.state, vm.vcpus, vm.memory_mib, vm.hostname) == ("starting", 1, 256, "web-1")
    assert vm.pending_request == accepted.request.event_id
    types = list(Event.objects.filter(aggregate_id=str(vm.pk)).values_list("type", flat=True))
    assert types == ["vm.created", "net.ip_leased", "vm.start_requested"]
    assert Usage.objects.get(user=caller.user).vms == 1
    created = Event.objects.get(type="vm.created")
    assert created.actor_name == caller.user.username and created.payload["mac"] == vm.mac


def test_outcome_settles_the_state_once(caller_for) -> None:
    caller = caller_for("operator")
    accepted = commands.create(caller, name="a", template="linux-small")
    settle(accepted, "vm.started", host="h1", hypervisor="qemu")
    vm = VirtualMachine.objects.get(pk=accepted.vm.pk)
    assert (vm.state, vm.pending_request, vm.host) == ("running", "", "h1")
    # A retried task's second outcome is refused by the unique request key.
    assert commands.record_outcome(accepted.request, "vm.start_failed", {"reason": "late"}) is None
    assert RequestOutcome.objects.filter(request_event_id=accepted.request.event_id).count() == 1
    assert VirtualMachine.objects.get(pk=vm.pk).state == "running"


def test_state_rules_give_clear_conflicts(caller_for) -> None:
    caller = caller_for("operator")
    accepted = commands.create(caller, name="b", template="linux-small")
    with pytest.raises(commands.Busy, match="busy with vm.start_requested"):
        commands.pause(caller, accepted.vm)
    settle(accepted, "vm.started")
    vm = VirtualMachine.objects.get(pk=accepted.vm.pk)
    with pytest.raises(commands.InvalidState, match="cannot start a VM that is running"):
        commands.start(caller, vm)
    with pytest.raises(commands.InvalidState, match="cannot resume"):
        commands.resume(caller, vm)
    # Destroy is allowed even while another request is pending: nothing gets stuck.
    p = commands.pause(caller, vm)
    d = commands.destroy(caller, p.vm)
    assert d.vm.state == "destroying"


def test_failed_outcome_keeps_a_reason(caller_for) -> None:
    caller = caller_for("operator")
    vm = running_vm(caller)
    p = commands.pause(caller, vm)
    settle(p, "vm.pause_failed", reason="QMP said no", state="running")
    vm.refresh_from_db()
    assert (vm.state, vm.last_error) == ("running", "QMP said no")


def test_operators_act_only_on_their_own_vms(caller_for) -> None:
    alice, bob = caller_for("operator"), caller_for("operator")
    vm = running_vm(alice)
    with pytest.raises(PermissionDenied, match="your own VMs"):
        commands.stop(bob, vm)
    assert list(policy.visible_vms(bob)) == []
    admin = caller_for("admin")
    admin.user.is_superuser = True
    admin.user.save()
    assert commands.stop(admin, vm).vm.state == "stopping"


@pytest.mark.parametrize("role", ["viewer", "auditor"])
def test_readers_cannot_drive(caller_for, role) -> None:
    reader = caller_for(role)
    with pytest.raises(PermissionDenied):
        commands.create(reader, name="x", template="linux-small")
    vm = running_vm(caller_for("operator"))
    assert vm in policy.visible_vms(reader)
    with pytest.raises(PermissionDenied):
        commands.stop(reader, vm)


def test_token_scopes_narrow_the_user(caller_for, make_user) -> None:
    from accounts.caller import Caller
    from audit.actor import Actor

    user = make_user("operator")
    issued = account_commands.create_token(Actor.system(), user, name="ci", scopes=["vms.exec_vm"])
    caller = Caller(user=user, token=issued.token, actor=Actor.for_user(user))
    with pytest.raises(PermissionDenied, match="token does not hold vms.add_virtualmachine"):
        commands.create(caller, name="x", template="linux-small")
    viewer = make_user("viewer")
    with pytest.raises(ValidationError, match="does not hold"):
        account_commands.create_token(Actor.system(), viewer, name="up", scopes=["vms.exec_vm"])


def test_user_quota_is_named_when_exceeded(caller_for) -> None:
    caller = caller_for("operator")
    Quota.objects.create(user=caller.user, max_vms=1, max_vcpus=4)
    commands.create(caller, name="one", template="linux-small")
    with pytest.raises(QuotaExceeded) as info:
        commands.create(caller, name="two", template="linux-small")
    assert info.value.quota == "vms" and info.value.limit == 1
    assert VirtualMachine.objects.filter(owner=caller.user).count() == 1


def test_group_quota_is_inherited_and_user_quota_wins(caller_for) -> None:
    from django.contrib.auth.models import Group

    caller = caller_for("operator")
    Quota.objects.create(group=Group.objects.get(name="operator"), max_vcpus=2)
    assert quotas.effective_quota(caller.user).vcpus == 2
    with pytest.raises(QuotaExceeded, match="vcpus"):
        commands.create(caller, name="big", template="linux-default", vcpus=3)
    Quota.objects.create(user=caller.user, max_vcpus=8)
    assert quotas.effective_quota(caller.user).source == "user"
    commands.create(caller, name="big", template="linux-default", vcpus=3)


def test_system_limits_and_input_validation(caller_for, settings) -> None:
    caller = caller_for("operator")
    settings.SANDBOX_MAX_VCPUS_PER_VM = 4
    with pytest.raises(QuotaExceeded, match="max_vcpus_per_vm"):
        commands.create(caller, name="x", template="linux-small", vcpus=5)
    for bad in ["", "has space", "x" * 64, "semi;colon"]:
        with pytest.raises(ValidationError):
            commands.create(caller, name=bad, template="linux-small")
    with pytest.raises(ValidationError, match="no enabled template"):
        commands.create(caller, name="ok", template="nope")
    commands.create(caller, name="dup", template="linux-small")
    with pytest.raises(ValidationError, match="already have a VM named"):
        commands.create(caller, name="dup", template="linux-small")
    assert Event.objects.filter(type="vm.created").count() == 1


def test_snapshot_lineage_clone_identity_and_retention(caller_for, settings, kept_image) -> None:
    caller = caller_for("operator")
    vm = running_vm(caller)
    first = commands.snapshot(caller, vm, name="s1")
    commands.record_outcome(
        first.request, "vm.snapshotted", {"snapshot_id": str(first.snapshot.pk)}
    )
    from audit import store
    from audit.actor import Actor

    store.append(
        "snapshot",
        str(first.snapshot.pk),
        "snapshot.created",
        {
            "manifest": {"state.bin": {"size": 1, "sha256": "0" * 64}},
            "size_bytes": 1,
            "image_id": kept_image,
        },
        actor=Actor.system(),
        expected_version=0,
    )
    vm.refresh_from_db()
    second = commands.snapshot(caller, vm, name="s2")
    assert second.snapshot.parent_id == first.snapshot.pk
    clone = commands.clone(caller, Snapshot.objects.get(pk=first.snapshot.pk), name="copy")
    original = VirtualMachine.objects.get(pk=vm.pk)
    assert clone.vm.state == "restoring" and clone.vm.source_snapshot_id == first.snapshot.pk
    assert (
        clone.vm.mac != original.mac and clone.vm.ip != original.ip and clone.vm.hostname == "copy"
    )
    from vms.retention import apply_retention

    assert apply_retention(keep_last=0, max_age_days=0) == 0
    settle(second, "vm.snapshot_failed", reason="disk full", snapshot_id=str(second.snapshot.pk))
    assert apply_retention(keep_last=0, max_age_days=0) == 0
    assert Usage.objects.get(user=caller.user).snapshots == 1


def test_rebuild_of_the_vm_projection_equals_the_incremental_one(caller_for) -> None:
    caller = caller_for("operator")
    vm = running_vm(caller, "r1")
    p = commands.pause(caller, vm)
    settle(p, "vm.paused")
    vm.refresh_from_db()
    s = commands.snapshot(caller, vm, name="snap")
    settle(s, "vm.snapshot_failed", reason="x", snapshot_id=str(s.snapshot.pk), state="paused")
    other = commands.create(caller, name="r2", template="linux-small")
    settle(other, "vm.start_failed", reason="no kernel")
    vm.refresh_from_db()
    d = commands.destroy(caller, vm)
    settle(d, "vm.destroyed")

    def snapshot_of_models():
        return (
            list(VirtualMachine.objects.order_by("pk").values()),
            list(Snapshot.objects.order_by("pk").values()),
            list(Usage.objects.order_by("pk").values()),
            list(RequestOutcome.objects.order_by("pk").values()),
        )

    before = snapshot_of_models()
    projections.rebuild("vms.state")
    assert snapshot_of_models() == before


@pytest.mark.django_db(transaction=True)
def test_concurrent_creates_at_the_quota_limit(make_user) -> None:
    from accounts.caller import Caller

    user = make_user("operator")
    Quota.objects.create(user=user, max_vms=3)
    caller = Caller.for_user(user, channel="api")
    barrier = threading.Barrier(8)
    results: list[str] = []

    def attempt(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            commands.create(caller, name=f"c{i}", template="linux-small")
            results.append("ok")
        except QuotaExceeded:
            results.append("quota")
        except Exception as exc:  # noqa: BLE001
            results.append(f"error {exc!r}")
        finally:
            connections.close_all()

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == ["ok"] * 3 + ["quota"] * 5, results
    assert VirtualMachine.objects.filter(owner=user).count() == 3
    assert Usage.objects.get(user=user).vms == 3


def test_addresses_are_the_lowest_free_and_run_out_cleanly(caller_for, settings) -> None:
    settings.SANDBOX_NETWORK_CIDR = "10.9.0.0/29"  # gateway .1, VMs .2 to .6
    settings.SANDBOX_MAX_VMS = 100
    caller = caller_for("admin")
    vms = [
        commands.create(caller, name=f"ip{i}", template="linux-small", start_now=False).vm
        for i in range(5)
    ]
    assert [vm.ip for vm in vms] == ["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"]
    # A full network: a clear refusal, nothing recorded.
    before = Event.objects.count()
    with pytest.raises(ValidationError, match="no free address"):
        commands.create(caller, name="ip5", template="linux-small", start_now=False)
    assert Event.objects.count() == before
    assert len({vm.mac for vm in vms}) == 5
    assert all(vm.mac.startswith("52:54:00:") for vm in vms)
    # A destroyed VM's address is free again, and it is the lowest one that is.
    settle(commands.destroy(caller, vms[1]), "vm.destroyed")
    again = commands.create(caller, name="ip-again", template="linux-small", start_now=False).vm
    assert again.ip == "10.9.0.3"


def test_the_system_vm_limit_counts_every_users_live_vms(caller_for, settings) -> None:
    settings.SANDBOX_MAX_VMS = 3
    alice, bob = caller_for("operator"), caller_for("operator")
    first = commands.create(alice, name="a1", template="linux-small", start_now=False)
    commands.create(alice, name="a2", template="linux-small", start_now=False)
    commands.create(bob, name="b1", template="linux-small", start_now=False)
    with pytest.raises(QuotaExceeded) as refused:
        commands.create(bob, name="b2", template="linux-small", start_now=False)
    assert (refused.value.quota, refused.value.scope, refused.value.used) == (
        "max_vms",
        "system",
        3,
    )
    assert not VirtualMachine.objects.filter(name="b2").exists()
    settle(commands.destroy(alice, first.vm), "vm.destroyed")  # a destroyed VM frees its place
    assert commands.create(bob, name="b2", template="linux-small", start_now=False).vm.name == "b2"
