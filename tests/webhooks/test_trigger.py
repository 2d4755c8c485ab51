"""The worker's tick (``webhooks.trigger``): it starts the pump when an event or a retry is
waiting, one pump at a time, and again once that one finished (or was lost)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from accounts.caller import Caller
from core import ticks
from webhooks import commands, dispatch, trigger
from webhooks.models import Delivery

pytestmark = pytest.mark.django_db


@pytest.fixture
def enqueued(monkeypatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(trigger, "enqueue", lambda: calls.append("pump"))
    monkeypatch.setattr(trigger, "_enqueued_at", None)
    return calls


def test_the_tick_is_registered_for_the_worker() -> None:
    assert ticks.registered()["webhooks"] is trigger.tick


def test_nothing_waiting_enqueues_nothing(enqueued, make_user) -> None:
    make_user("operator", "alice")  # events, but no subscription
    trigger.tick(timezone.now())
    assert enqueued == []


def test_an_event_starts_one_pump_and_the_next_waits_for_it_to_finish(enqueued, subscribe) -> None:
    sub = subscribe("http://127.0.0.1:9/", ["webhook.*"]).subscription
    commands.ping(Caller.for_user(sub.owner), sub)
    now = timezone.now()
    trigger.tick(now)
    trigger.tick(now + timedelta(seconds=1))  # still running: not again
    assert enqueued == ["pump"]
    dispatch.fan_out()  # what the pump does first; it has not finished yet
    trigger.tick(now + timedelta(seconds=2))
    assert enqueued == ["pump"]
    dispatch.pump(max_seconds=0.1)  # it finished (the attempt failed: nothing listens)
    Delivery.objects.update(next_attempt_at=timezone.now())  # its retry is due
    trigger.tick(timezone.now() + timedelta(seconds=1))
    assert enqueued == ["pump", "pump"]


def test_a_lost_pump_is_started_again_after_its_longest_run(enqueued, subscribe) -> None:
    sub = subscribe("http://127.0.0.1:9/", ["webhook.*"]).subscription
    commands.ping(Caller.for_user(sub.owner), sub)
    now = timezone.now()
    trigger.tick(now)
    later = now + timedelta(seconds=dispatch.pump_timeout_s() + 1)
    trigger.tick(later)
    assert enqueued == ["pump", "pump"]
