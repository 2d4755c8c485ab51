"""The dashboard's Webhooks pages: a new subscription's secret shown on the answer to the form
and never again, the deliveries with their attempts, the actions, and who sees what."""

from __future__ import annotations

import pytest
from django.test import Client

from audit.models import Event
from webhooks.models import Subscription

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def private_allowed(settings):
    settings.SANDBOX_WEBHOOK_ALLOW_PRIVATE = True


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_subscribe_from_the_page_shows_the_secret_once(make_user, receiver, pump_until) -> None:
    alice = make_user("operator", "alice")
    client = logged_in(alice)
    page = client.get("/webhooks/")
    assert page.status_code == 200 and b"webhook-create" in page.content
    assert b"allow_private" not in page.content  # an operator is not offered it
    r = client.post(
        "/webhooks/",
        {"url": receiver.url, "event_types": "vm.* snapshot.created", "description": "ci"},
    )
    assert r.status_code == 200
    sub = Subscription.objects.get()
    assert sub.event_types == ["vm.*", "snapshot.created"]
    text = r.content.decode()
    start = text.index('id="new-secret">') + len('id="new-secret">')
    secret = text[start : text.index("<", start)]
    assert secret.startswith("whsec_")
    assert secret not in client.get("/webhooks/").content.decode()
    detail = client.get(f"/webhooks/{sub.pk}/").content.decode()
    assert secret not in detail and receiver.url.replace("&", "&amp;") in detail

    r = client.post(f"/webhooks/{sub.pk}/ping/", follow=True)
    assert b"Ping recorded" in r.content
    pump_until(lambda: receiver.requests, what="the ping")
    detail = client.get(f"/webhooks/{sub.pk}/").content.decode()
    assert "webhook.pinged" in detail and "HTTP 200" in detail

    r = client.post(f"/webhooks/{sub.pk}/rotate/")
    assert r.status_code == 200 and b"version 2" in r.content
    client.post(f"/webhooks/{sub.pk}/disable/")
    assert not Subscription.objects.get().active
    client.post(f"/webhooks/{sub.pk}/enable/")
    assert Subscription.objects.get().active
    r = client.post(f"/webhooks/{sub.pk}/", {"url": receiver.url, "event_types": "vm.created"})
    assert r.status_code == 302 and Subscription.objects.get().event_types == ["vm.created"]
    assert client.get(f"/webhooks/{sub.pk}/delete/").status_code == 200
    assert client.post(f"/webhooks/{sub.pk}/delete/").status_code == 302
    assert not Subscription.objects.exists()
    assert Event.objects.filter(type="webhook.deleted").count() == 1


def test_form_errors_are_shown_and_nothing_is_recorded(make_user) -> None:
    client = logged_in(make_user("operator", "alice"))
    before = Event.objects.count()
    r = client.post("/webhooks/", {"url": "http://169.254.169.254/", "event_types": "vm.*"})
    assert r.status_code == 200 and b"not allowed as a webhook target" in r.content
    r = client.post("/webhooks/", {"url": "http://127.0.0.1:9/", "event_types": "auth.*"})
    assert b"may not receive" in r.content
    assert Event.objects.count() == before


def test_who_sees_which_webhooks(make_user) -> None:
    from accounts.caller import Caller
    from webhooks import commands

    alice = make_user("operator", "alice")
    sub = commands.subscribe(
        Caller.for_user(alice), url="http://127.0.0.1:9/in?token=t0p", event_types=["vm.*"]
    ).subscription
    assert logged_in(make_user("viewer", "vic")).get("/webhooks/").status_code == 403
    bob = logged_in(make_user("operator", "bob"))
    assert b"No webhook subscriptions yet" in bob.get("/webhooks/").content
    assert bob.get(f"/webhooks/{sub.pk}/").status_code == 404
    assert bob.post(f"/webhooks/{sub.pk}/disable/").status_code == 404
    auditor = logged_in(make_user("auditor", "ann"))
    page = auditor.get(f"/webhooks/{sub.pk}/").content.decode()
    assert "t0p" not in page and "http://127.0.0.1:9" in page
    assert "webhook-edit" not in page
    assert auditor.post(f"/webhooks/{sub.pk}/disable/", follow=True).status_code == 200
    assert Subscription.objects.get().active
