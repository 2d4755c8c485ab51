"""Deliveries to a real receiver on 127.0.0.1, run by the test: signed (the signature verifies
with the secret shown once), retried with back-off after a 500, a dead receiver ending in a
disabled subscription and its event, at least once across a worker that died mid-attempt, and
never in the way of a command."""

from __future__ import annotations

import json
import time

import pytest
from django.core.exceptions import ValidationError

from accounts.caller import Caller
from audit.models import Event
from vms import commands as vm_commands
from webhooks import commands, dispatch, signing
from webhooks.models import Delivery, DeliveryAttempt, Subscription

pytestmark = pytest.mark.django_db


def make_vm(user, name="hooked"):
    caller = Caller.for_user(user, channel="api")
    return vm_commands.create(caller, name=name, template="linux-small", start_now=False).vm


def test_a_delivery_is_signed_and_the_signature_verifies(
    receiver, subscribe, make_user, pump_until
) -> None:
    issued = subscribe(receiver.url, ["vm.created"])
    vm = make_vm(make_user("operator", "alice"))
    pump_until(lambda: receiver.requests, what="the delivery")

    [got] = receiver.requests
    assert got.path == "/hooks/sandbox?token=receiver-own-token"
    assert got.headers["Content-Type"] == "application/json"
    header = got.headers["Sandbox-Signature"]
    assert signing.verify(issued.secret, got.body, header)
    # A byte changed, another secret, or an old timestamp: refused.
    assert not signing.verify(issued.secret, got.body + b" ", header)
    assert not signing.verify(signing.new_secret(), got.body, header)
    stamp = int(header.split(",")[0].removeprefix("t="))
    assert abs(stamp - time.time()) < 60
    assert not signing.verify(issued.secret, got.body, header, tolerance_s=-1)

    event = Event.objects.get(type="vm.created", aggregate_id=str(vm.pk))
    body = json.loads(got.body)
    assert body["event"]["event_id"] == str(event.event_id) == got.headers["Sandbox-Event-Id"]
    assert body["event"]["position"] == event.position
    assert body["event"]["data"] == event.payload
    assert got.headers["Sandbox-Event-Type"] == "vm.created"
    delivery = Delivery.objects.get()
    assert body["delivery_id"] == str(delivery.pk) == got.headers["Sandbox-Delivery-Id"]
    assert body["subscription_id"] == str(issued.subscription.pk)
    assert got.headers["Sandbox-Delivery-Attempt"] == "1"
    assert delivery.status == "delivered" and delivery.attempts == 1
    [attempt] = DeliveryAttempt.objects.filter(delivery=delivery)
    assert attempt.status_code == 200 and attempt.address == "127.0.0.1"
    assert attempt.response_excerpt == "thanks" and attempt.error == ""
    sub = Subscription.objects.get()
    assert sub.last_success_at is not None and sub.consecutive_failures == 0


def test_a_500_from_the_receiver_is_retried_with_back_off(
    receiver, subscribe, make_user, pump_until, fast
) -> None:
    receiver.answer(500, 503)
    subscribe(receiver.url, ["vm.created"])
    make_vm(make_user("operator", "alice"))
    pump_until(lambda: Delivery.objects.filter(status="delivered").exists(), what="delivered")

    assert [r.headers["Sandbox-Delivery-Attempt"] for r in receiver.requests] == ["1", "2", "3"]
    # One delivery, one event: the same ids on every attempt, the same body.
    assert len({r.headers["Sandbox-Delivery-Id"] for r in receiver.requests}) == 1
    assert len({r.headers["Sandbox-Event-Id"] for r in receiver.requests}) == 1
    assert len({r.body for r in receiver.requests}) == 1
    delivery = Delivery.objects.get()
    attempts = list(DeliveryAttempt.objects.filter(delivery=delivery).order_by("number"))
    assert [(a.number, a.status_code) for a in attempts] == [(1, 500), (2, 503), (3, 200)]
    assert attempts[0].error == "HTTP 500" and attempts[0].next_retry_at is not None
    assert attempts[2].next_retry_at is None
    # Each retry waited for its back-off (jittered between half and all of base * 2^(n-1)).
    for before, after, n in ((attempts[0], attempts[1], 1), (attempts[1], attempts[2], 2)):
        waited = (after.started_at - before.started_at).total_seconds()
        assert waited >= 0.05 * 2 ** (n - 1) * 0.5
    assert Subscription.objects.get().consecutive_failures == 0


def test_a_dead_receiver_ends_in_a_disabled_subscription_and_an_event(
    dead_url, subscribe, make_user, pump_until, fast
) -> None:
    issued = subscribe(dead_url, ["vm.*"])
    alice = make_user("operator", "alice")
    for name in ("one", "two", "three"):
        make_vm(alice, name)
    sub = pump_until(
        lambda: Subscription.objects.filter(active=False).first(), what="the subscription disabled"
    )
    assert sub.disabled_reason == "failing" and sub.consecutive_failures == 2
    [disabled] = Event.objects.filter(type="webhook.disabled")
    assert disabled.aggregate_id == str(issued.subscription.pk)
    assert disabled.actor_type == "system" and disabled.actor_name == "webhook-dispatcher"
    data = disabled.payload
    assert data["reason"] == "failing" and data["consecutive_failures"] == 2
    assert data["last_error"].startswith("could not connect")
    assert data["owner"] == "hook-admin" and data["target"] == dead_url.rsplit("/", 1)[0]
    # Two deliveries ran out of attempts, one by one (the others waited behind them); what was
    # still pending was cancelled, and nothing more is attempted.
    failed = Delivery.objects.filter(status="failed")
    assert failed.count() == 2
    assert all(d.attempts == 3 for d in failed)
    assert not Delivery.objects.filter(status="pending").exists()
    assert Delivery.objects.filter(status="cancelled").count() == data["cancelled_deliveries"] > 0
    attempts = DeliveryAttempt.objects.count()
    dispatch.pump(max_seconds=1)
    assert DeliveryAttempt.objects.count() == attempts

    # The owner enables it again: events from then on are delivered, not those in between.
    commands.enable(Caller.for_user(issued.subscription.owner), issued.subscription)
    assert Event.objects.filter(type="webhook.enabled").count() == 1
    assert Subscription.objects.get().consecutive_failures == 0


def test_a_command_only_appends_its_event_and_never_waits_for_a_receiver(
    receiver, subscribe, make_user, pump_until
) -> None:
    receiver.delay = 3.0
    subscribe(receiver.url, ["vm.*"])
    alice = make_user("operator", "alice")
    started = time.monotonic()
    make_vm(alice)
    assert time.monotonic() - started < 1.5
    assert receiver.requests == [] and not Delivery.objects.exists()
    # The workers deliver it afterwards.
    pump_until(lambda: Delivery.objects.filter(status="delivered").exists(), what="delivered")


def test_a_worker_that_died_mid_attempt_leaves_the_delivery_to_be_sent_again(
    receiver, subscribe, make_user, pump_until
) -> None:
    subscribe(receiver.url, ["vm.created"])
    make_vm(make_user("operator", "alice"))
    dispatch.fan_out()
    [claimed] = dispatch.claim()  # ... and the worker died here, maybe after sending
    assert claimed.attempts == 1
    assert dispatch.claim() == []  # its claim holds: no other pump sends it meanwhile
    # The claim lapses (here at once, instead of after SANDBOX_WEBHOOK_TIMEOUT_S-based time).
    Delivery.objects.filter(pk=claimed.pk).update(next_attempt_at=claimed.created_at)
    pump_until(lambda: receiver.requests, what="the delivery again")
    delivery = Delivery.objects.get()
    assert delivery.status == "delivered" and delivery.attempts == 2
    assert receiver.requests[0].headers["Sandbox-Delivery-Attempt"] == "2"
    assert receiver.requests[0].headers["Sandbox-Delivery-Id"] == str(claimed.pk)


def test_each_event_is_fanned_out_once_however_often_the_pump_runs(
    receiver, subscribe, make_user, pump_until
) -> None:
    subscribe(receiver.url, ["vm.created"])
    alice = make_user("operator", "alice")
    for i in range(3):
        make_vm(alice, f"vm{i}")
    for _ in range(3):
        dispatch.fan_out()
    assert Delivery.objects.count() == 3
    pump_until(lambda: len(receiver.requests) == 3, what="three deliveries")
    dispatch.pump(max_seconds=1)
    assert len(receiver.requests) == 3
    # In log order.
    positions = [json.loads(r.body)["event"]["position"] for r in receiver.requests]
    assert positions == sorted(positions)


def test_a_subscription_gets_only_events_after_it_was_made(
    receiver, subscribe, make_user, pump_until
) -> None:
    alice = make_user("operator", "alice")
    make_vm(alice, "before")
    subscribe(receiver.url, ["vm.created"])
    make_vm(alice, "after")
    pump_until(lambda: receiver.requests, what="a delivery")
    dispatch.pump(max_seconds=1)
    assert [json.loads(r.body)["event"]["data"]["name"] for r in receiver.requests] == ["after"]


def test_a_ping_is_delivered_to_its_subscription_whatever_its_types(
    receiver, subscribe, pump_until
) -> None:
    issued = subscribe(receiver.url, ["snapshot.created"])
    sub = issued.subscription
    event = commands.ping(Caller.for_user(sub.owner), sub)
    pump_until(lambda: receiver.requests, what="the ping")
    assert receiver.requests[0].headers["Sandbox-Event-Type"] == "webhook.pinged"
    assert receiver.requests[0].headers["Sandbox-Event-Id"] == event.event_id
    # A disabled subscription is not pinged.
    commands.disable(Caller.for_user(sub.owner), sub)
    with pytest.raises(ValidationError):
        commands.ping(Caller.for_user(sub.owner), Subscription.objects.get())


def test_redirects_are_not_followed_and_answers_are_read_only_a_few_kib(
    receiver, subscribe, make_user, pump_until, fast
) -> None:
    receiver.answers.append((302, b"", {"Location": "http://169.254.169.254/latest/meta-data/"}))
    receiver.answers.append((200, b"x" * (1 << 20), {}))
    subscribe(receiver.url, ["vm.created"])
    make_vm(make_user("operator", "alice"))
    pump_until(lambda: Delivery.objects.filter(status="delivered").exists(), what="delivered")
    first, second = DeliveryAttempt.objects.order_by("number")
    assert first.status_code == 302 and "redirects are not followed" in first.error
    assert len(receiver.requests) == 2  # the redirect's target was never asked
    assert second.status_code == 200 and len(second.response_excerpt) == 4096


def test_a_receiver_that_does_not_answer_in_time_is_a_failed_attempt(
    receiver, subscribe, make_user, pump_until, fast
) -> None:
    fast.SANDBOX_WEBHOOK_TIMEOUT_S = 0.5
    receiver.delay = 2.0
    subscribe(receiver.url, ["vm.created"])
    make_vm(make_user("operator", "alice"))
    attempt = pump_until(lambda: DeliveryAttempt.objects.first(), what="an attempt")
    assert attempt.status_code is None and "no answer within 0.5s" in attempt.error
    assert attempt.duration_ms < 1500


def test_a_subscription_deleted_while_its_delivery_is_in_flight_stops_nothing(
    receiver, subscribe, make_user
) -> None:
    issued = subscribe(receiver.url, ["vm.created"])
    make_vm(make_user("operator", "alice"))
    dispatch.fan_out()
    claimed = dispatch.claim()
    commands.delete(Caller.for_user(issued.subscription.owner), issued.subscription)
    report = dispatch.PumpReport()
    dispatch._round(claimed, report)  # sent before it knew; nothing left to record it on
    assert not Delivery.objects.exists() and not DeliveryAttempt.objects.exists()
