"""``/api/v1/webhooks/``: the secret in the create and rotate answers only, deliveries with
their attempts, ping, disable and enable; bad input a 400 that records nothing; others'
subscriptions missing; token scopes apply, also to what a subscription may carry."""

from __future__ import annotations

import pytest

from audit.models import Event
from webhooks.models import Subscription

pytestmark = pytest.mark.django_db

API = "/api/v1/webhooks/"


@pytest.fixture(autouse=True)
def private_allowed(settings):
    settings.SANDBOX_WEBHOOK_ALLOW_PRIVATE = True


def test_create_read_change_ping_and_delete(receiver, make_user, token_client, pump_until) -> None:
    alice = make_user("operator", "alice")
    client = token_client(alice)
    r = client.post(
        API,
        {"url": receiver.url, "event_types": ["vm.*"], "description": "ci"},
        format="json",
    )
    assert r.status_code == 201, r.content
    created = r.json()
    secret, sid = created["secret"], created["id"]
    assert secret.startswith("whsec_") and created["owner"] == "alice"
    assert (
        created["url"] == receiver.url and created["target"] == f"http://127.0.0.1:{receiver.port}"
    )
    assert created["filters"] == {"vm_ids": [], "owners": []} and created["active"] is True

    listed = client.get(API).json()["results"]
    assert [s["id"] for s in listed] == [sid] and "secret" not in listed[0]
    r = client.patch(f"{API}{sid}/", {"description": "ci hooks"}, format="json")
    assert r.status_code == 200 and r.json()["description"] == "ci hooks"
    updated = Event.objects.get(type="webhook.updated").payload
    assert updated["changed"] == ["description"] and updated["description"] == "ci hooks"

    r = client.post(f"{API}{sid}/ping/")
    assert r.status_code == 202
    pinged = r.json()["event_id"]
    pump_until(lambda: receiver.requests, what="the ping")
    deliveries = client.get(f"{API}{sid}/deliveries/").json()["results"]
    assert [d["event_type"] for d in deliveries] == ["webhook.pinged"]
    assert deliveries[0]["status"] == "delivered" and deliveries[0]["event_id"] == pinged
    assert deliveries[0]["attempt_log"][0]["status_code"] == 200
    assert client.get(f"{API}{sid}/deliveries/?status=failed").json()["results"] == []
    assert client.get(f"{API}{sid}/deliveries/?status=nonsense").status_code == 400

    r = client.post(f"{API}{sid}/rotate-secret/")
    assert r.status_code == 200 and r.json()["secret"] != secret
    assert r.json()["secret_version"] == 2
    assert client.post(f"{API}{sid}/disable/").json()["active"] is False
    assert client.post(f"{API}{sid}/ping/").status_code == 400
    assert client.post(f"{API}{sid}/enable/").json()["active"] is True
    assert client.delete(f"{API}{sid}/").status_code == 204
    assert not Subscription.objects.exists()
    assert [e.type for e in Event.objects.filter(aggregate_type="webhook")] == [
        "webhook.subscribed",
        "webhook.updated",
        "webhook.pinged",
        "webhook.secret_rotated",
        "webhook.disabled",
        "webhook.enabled",
        "webhook.deleted",
    ]


def test_bad_input_is_a_400_and_records_nothing(make_user, token_client) -> None:
    client = token_client(make_user("operator", "alice"))
    before = Event.objects.count()
    for body in [
        {"url": "http://169.254.169.254/", "event_types": ["vm.*"]},
        {"url": "ftp://example.com/", "event_types": ["vm.*"]},
        {"url": "http://127.0.0.1:9/", "event_types": []},
        {"url": "http://127.0.0.1:9/", "event_types": ["nope.*"]},
        {"url": "http://127.0.0.1:9/", "event_types": "vm.*"},
        {"url": "http://127.0.0.1:9/", "event_types": ["vm.*"], "filters": {"vm_ids": ["x"]}},
        {"url": "http://127.0.0.1:9/", "event_types": ["vm.*"], "description": "a\nb"},
        {"event_types": ["vm.*"]},
    ]:
        r = client.post(API, body, format="json")
        assert r.status_code == 400, (body, r.content)
    r = client.post(
        API, {"url": "http://127.0.0.1:9/", "event_types": ["vm.*"], "allow_private": True},
        format="json",
    )  # fmt: skip
    assert r.status_code == 403, r.content
    assert Event.objects.count() == before and not Subscription.objects.exists()


def test_other_users_subscriptions_look_missing_and_auditors_see_origins_only(
    make_user, token_client
) -> None:
    alice, bob = make_user("operator", "alice"), make_user("operator", "bob")
    r = token_client(alice).post(
        API, {"url": "http://127.0.0.1:9/in?token=t0p", "event_types": ["vm.*"]}, format="json"
    )
    sid = r.json()["id"]
    as_bob = token_client(bob)
    assert as_bob.get(API).json()["results"] == []
    for method, path in [
        ("get", f"{API}{sid}/"),
        ("get", f"{API}{sid}/deliveries/"),
        ("patch", f"{API}{sid}/"),
        ("delete", f"{API}{sid}/"),
        ("post", f"{API}{sid}/ping/"),
        ("post", f"{API}{sid}/rotate-secret/"),
    ]:
        assert getattr(as_bob, method)(path, {}, format="json").status_code == 404, path
    assert as_bob.get(f"{API}not-a-uuid/").status_code == 404
    auditor = token_client(make_user("auditor", "ann"))
    [seen] = auditor.get(API).json()["results"]
    assert seen["url"] is None and seen["target"] == "http://127.0.0.1:9"
    assert auditor.patch(f"{API}{sid}/", {"description": "x"}, format="json").status_code == 403
    admin = token_client(make_user("admin", "root"))
    assert admin.get(f"{API}{sid}/").json()["url"] == "http://127.0.0.1:9/in?token=t0p"
    viewer = token_client(make_user("viewer", "vic"))
    assert viewer.get(API).json()["results"] == []
    assert (
        viewer.post(
            API, {"url": "http://8.8.8.8/", "event_types": ["vm.*"]}, format="json"
        ).status_code
        == 403
    )


def test_token_scopes_apply_to_the_endpoints_and_to_what_a_subscription_carries(
    make_user, token_client
) -> None:
    alice = make_user("operator", "alice")
    vm_only = token_client(alice, scopes=["vms.exec_vm"])
    r = vm_only.post(API, {"url": "http://127.0.0.1:9/", "event_types": ["vm.*"]}, format="json")
    assert r.status_code == 403
    read_only = token_client(alice, read_only=True)
    r = read_only.post(API, {"url": "http://127.0.0.1:9/", "event_types": ["vm.*"]}, format="json")
    assert r.status_code == 403
    # A token that may subscribe but not read VMs cannot subscribe to VM events...
    hooks_only = token_client(alice, scopes=["webhooks.add_subscription"])
    r = hooks_only.post(API, {"url": "http://127.0.0.1:9/", "event_types": ["vm.*"]}, format="json")
    assert r.status_code == 400 and "may not receive" in r.content.decode()
    # ... only to its own webhooks' events, and the subscription keeps the token's scopes.
    r = hooks_only.post(
        API, {"url": "http://127.0.0.1:9/", "event_types": ["webhook.*"]}, format="json"
    )
    assert r.status_code == 201, r.content
    assert Subscription.objects.get().scopes == ["webhooks.add_subscription"]
    event = Event.objects.get(type="webhook.subscribed")
    assert event.payload["scopes"] == ["webhooks.add_subscription"]
    assert event.token_id  # the token that made it is on record
