"""The webhooks' metrics on /metrics, read from the tables when scraped."""

from __future__ import annotations

import pytest
from django.test import Client

from accounts.caller import Caller
from webhooks import commands, dispatch

pytestmark = pytest.mark.django_db


def scrape() -> str:
    return Client().get("/metrics").content.decode()


def test_deliveries_subscriptions_and_the_dispatch_lag_are_exported(subscribe) -> None:
    sub = subscribe("http://127.0.0.1:9/", ["webhook.*"]).subscription
    commands.ping(Caller.for_user(sub.owner), sub)
    body = scrape()
    assert 'sandbox_webhook_subscriptions{state="active"} 1.0' in body
    assert "sandbox_webhook_dispatch_lag_events 0.0" not in body  # the ping is not fanned out
    dispatch.fan_out()
    body = scrape()
    assert "sandbox_webhook_dispatch_lag_events 0.0" in body
    assert 'sandbox_webhook_deliveries{status="pending"} 1.0' in body
    commands.disable(Caller.for_user(sub.owner), sub)
    body = scrape()
    assert 'sandbox_webhook_deliveries{status="cancelled"} 1.0' in body
    assert 'sandbox_webhook_subscriptions{state="disabled"} 1.0' in body
