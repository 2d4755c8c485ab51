"""Who receives what: a subscription delivers as its owner, asked again at delivery time.
Operators get the events of their own VMs, auditors the whole trail, viewers cannot subscribe;
filters narrow further."""

from __future__ import annotations

import json

import pytest
from django.core.exceptions import PermissionDenied, ValidationError

from accounts import commands as account_commands
from accounts.caller import Caller
from audit.actor import Actor
from audit.models import Event
from vms import commands as vm_commands
from webhooks import commands, dispatch
from webhooks.models import Delivery, Subscription

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def private_allowed(settings):
    """Operators cannot allow private targets themselves; the receiver is on 127.0.0.1."""
    settings.SANDBOX_WEBHOOK_ALLOW_PRIVATE = True


def caller(user) -> Caller:
    return Caller.for_user(user, channel="api")


def make_vm(user, name):
    return vm_commands.create(caller(user), name=name, template="linux-small", start_now=False).vm


def delivered_types(receiver) -> list[tuple[str, str]]:
    out = []
    for r in receiver.requests:
        event = json.loads(r.body)["event"]
        out.append((event["type"], event["aggregate_id"]))
    return out


def test_an_operator_receives_only_the_events_of_its_own_vms(
    receiver, make_user, pump_until
) -> None:
    alice, bob = make_user("operator", "alice"), make_user("operator", "bob")
    commands.subscribe(caller(alice), url=receiver.url, event_types=["*"])
    mine, theirs = make_vm(alice, "mine"), make_vm(bob, "theirs")
    make_user("viewer", "carol")  # user.created: the audit trail's, not alice's
    pump_until(lambda: receiver.requests, what="alice's events")
    dispatch.pump(max_seconds=1)
    got = delivered_types(receiver)
    assert ("vm.created", str(mine.pk)) in got
    assert all(aggregate == str(mine.pk) for _, aggregate in got), got
    assert not any(aggregate == str(theirs.pk) for _, aggregate in got)


def test_the_owners_permission_is_asked_again_when_the_event_is_delivered(
    receiver, make_user, pump_until
) -> None:
    alice = make_user("operator", "alice")
    commands.subscribe(caller(alice), url=receiver.url, event_types=["vm.created"])
    make_vm(alice, "mine")
    dispatch.fan_out()
    assert Delivery.objects.filter(status="pending").count() == 1
    # Before the workers send it, alice becomes a viewer: viewers may not subscribe.
    admin = make_user("admin", "root")
    account_commands.set_role(Actor.for_user(admin), alice, "viewer", by=admin)
    dispatch.pump(max_seconds=2)
    delivery = Delivery.objects.get()
    assert delivery.status == "skipped" and delivery.attempts == 1
    assert receiver.requests == []


def test_a_deactivated_owner_gets_nothing(receiver, make_user) -> None:
    alice = make_user("operator", "alice")
    commands.subscribe(caller(alice), url=receiver.url, event_types=["vm.created"])
    make_vm(alice, "hers")
    root = make_user("admin", "root")
    account_commands.set_active(Actor.for_user(root), alice, False, by=root)
    dispatch.pump(max_seconds=2)
    assert receiver.requests == [] and not Delivery.objects.filter(status="delivered").exists()


def test_an_auditor_receives_the_whole_trail_read_only(receiver, make_user, pump_until) -> None:
    auditor, bob = make_user("auditor", "ann"), make_user("operator", "bob")
    commands.subscribe(caller(auditor), url=receiver.url, event_types=["user.*", "vm.created"])
    theirs = make_vm(bob, "theirs")
    make_user("viewer", "carol")
    pump_until(lambda: len(receiver.requests) >= 2, what="two events")
    got = delivered_types(receiver)
    assert ("vm.created", str(theirs.pk)) in got
    assert any(t == "user.created" for t, _ in got)
    # Read-only: it may not act on anyone's VMs, nor on other users' subscriptions.
    assert not Caller.for_user(auditor).has("vms.operate_vm")


def test_viewers_may_not_subscribe(make_user) -> None:
    viewer = make_user("viewer", "vic")
    with pytest.raises(PermissionDenied):
        commands.subscribe(caller(viewer), url="http://8.8.8.8/", event_types=["vm.*"])
    assert not Subscription.objects.exists()


def test_an_operators_globs_must_match_events_it_may_receive(make_user) -> None:
    alice = make_user("operator", "alice")
    before = Event.objects.count()
    for types, why in (
        (["auth.*"], "may not receive"),
        (["user.created"], "may not receive"),
        (["vm.strated"], "matches no event type"),
        (["VM.*"], "lower-case"),
        ([], "at least one"),
        (["x" * 65], "lower-case"),
    ):
        with pytest.raises(ValidationError, match=why):
            commands.subscribe(caller(alice), url="http://8.8.8.8/", event_types=types)
    assert Event.objects.count() == before
    # "*" matches the VM events it receives, among others.
    assert commands.subscribe(caller(alice), url="http://8.8.8.8/", event_types=["*"])


def test_filters_narrow_to_some_vms_and_only_to_vms_the_caller_sees(
    receiver, make_user, pump_until
) -> None:
    alice, bob = make_user("operator", "alice"), make_user("operator", "bob")
    one, two = make_vm(alice, "one"), make_vm(alice, "two")
    theirs = make_vm(bob, "theirs")
    with pytest.raises(ValidationError, match="no such VM"):
        commands.subscribe(
            caller(alice), url=receiver.url, event_types=["vm.*"], vm_ids=[str(theirs.pk)]
        )
    with pytest.raises(ValidationError, match="only by yourself"):
        commands.subscribe(caller(alice), url=receiver.url, event_types=["vm.*"], owners=["bob"])
    issued = commands.subscribe(
        caller(alice), url=receiver.url, event_types=["vm.*"], vm_ids=[str(two.pk)]
    )
    assert Event.objects.get(type="webhook.subscribed").payload["filters"] == {
        "vm_ids": [str(two.pk)],
        "owners": [],
    }
    for vm in (one, two):
        vm_commands.destroy(caller(alice), vm)
    commands.ping(caller(alice), issued.subscription)
    pump_until(lambda: any(t == "webhook.pinged" for t, _ in delivered_types(receiver)))
    dispatch.pump(max_seconds=1)
    vm_events = [a for t, a in delivered_types(receiver) if t.startswith("vm.")]
    assert vm_events and set(vm_events) == {str(two.pk)}


def test_an_admins_owner_filter_takes_one_users_vms(receiver, make_user, pump_until) -> None:
    admin = make_user("admin", "root")
    alice, bob = make_user("operator", "alice"), make_user("operator", "bob")
    commands.subscribe(caller(admin), url=receiver.url, event_types=["vm.created"], owners=["bob"])
    make_vm(alice, "hers")
    theirs = make_vm(bob, "his")
    pump_until(lambda: receiver.requests, what="bob's event")
    dispatch.pump(max_seconds=1)
    assert delivered_types(receiver) == [("vm.created", str(theirs.pk))]
