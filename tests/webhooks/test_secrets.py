"""The signing secret: made by the server, shown once, sealed at rest with the secrets store's
keys; never in an event, a log line, an export or an API answer after the first. A new secret
signs beside the previous one during a grace period; a key rotation re-encrypts it."""

from __future__ import annotations

import base64
import logging
import os
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from accounts.caller import Caller
from audit.models import Event
from secretstore import crypto
from webhooks import commands, signing
from webhooks.models import DeliveryAttempt, Subscription

pytestmark = pytest.mark.django_db


def all_text() -> str:
    """Every table's rows, as text (what a database dump would hold)."""
    out = []
    with connection.cursor() as cur:
        for table in connection.introspection.table_names():
            cur.execute(f'SELECT * FROM "{table}"')
            out.extend(repr(row) for row in cur.fetchall())
    return "\n".join(out)


def test_the_secret_is_shown_once_and_found_nowhere_else(
    receiver, subscribe, pump_until, caplog, token_client, make_user
) -> None:
    caplog.set_level(logging.DEBUG)
    issued = subscribe(receiver.url, ["webhook.*"])
    sub = issued.subscription
    assert issued.secret.startswith("whsec_") and len(issued.secret) > 40
    rotated = commands.rotate_secret(Caller.for_user(sub.owner), sub)
    commands.ping(Caller.for_user(sub.owner), sub)
    pump_until(lambda: receiver.requests, what="the ping")

    for secret in (issued.secret, rotated.secret):
        assert secret not in all_text()
        assert all(secret not in e.data for e in Event.objects.all())
        assert secret not in caplog.text
        assert secret.encode() not in receiver.requests[0].body
    row = Subscription.objects.get()
    assert rotated.secret.encode() not in bytes(row.secret_ciphertext)
    assert row.secret_key_id == crypto.keyring().current_id
    # The API shows it to nobody afterwards, its owner included.
    client = token_client(sub.owner)
    for path in (f"/api/v1/webhooks/{sub.pk}/", "/api/v1/webhooks/"):
        body = client.get(path).content.decode()
        assert issued.secret not in body and rotated.secret not in body


def test_the_sealed_secret_is_bound_to_its_subscription(subscribe) -> None:
    one = subscribe("http://127.0.0.1:9/a", ["webhook.*"]).subscription
    two = subscribe("http://127.0.0.1:9/b", ["webhook.*"]).subscription
    one.secret_nonce, one.secret_ciphertext = two.secret_nonce, two.secret_ciphertext
    with pytest.raises(crypto.DecryptionFailed):
        commands.signing_secrets(one)


def test_after_a_rotation_both_secrets_sign_until_the_grace_ends(
    receiver, subscribe, pump_until, settings
) -> None:
    settings.SANDBOX_WEBHOOK_SECRET_GRACE_S = 3600
    issued = subscribe(receiver.url, ["webhook.pinged"])
    sub = issued.subscription
    rotated = commands.rotate_secret(Caller.for_user(sub.owner), sub)
    assert rotated.subscription.secret_version == 2
    event = Event.objects.get(type="webhook.secret_rotated")
    assert event.payload["secret_version"] == 2 and event.payload["previous_valid_until"]
    commands.ping(Caller.for_user(sub.owner), sub)
    pump_until(lambda: receiver.requests, what="the ping")
    got = receiver.requests[-1]
    header = got.headers["Sandbox-Signature"]
    assert header.count("v1=") == 2
    assert signing.verify(rotated.secret, got.body, header)
    assert signing.verify(issued.secret, got.body, header)
    # Once the grace is over, only the new one signs.
    Subscription.objects.filter(pk=sub.pk).update(
        previous_until=timezone.now() - timedelta(seconds=1)
    )
    commands.ping(Caller.for_user(sub.owner), sub)
    pump_until(lambda: len(receiver.requests) == 2, what="the second ping")
    got = receiver.requests[-1]
    header = got.headers["Sandbox-Signature"]
    assert header.count("v1=") == 1
    assert signing.verify(rotated.secret, got.body, header)
    assert not signing.verify(issued.secret, got.body, header)


def test_a_key_rotation_reencrypts_webhook_secrets_and_they_still_sign(
    receiver, subscribe, pump_until, settings
) -> None:
    old = base64.b64encode(os.urandom(32)).decode()
    new = base64.b64encode(os.urandom(32)).decode()
    settings.SANDBOX_SECRETS_KEYS = f"old:{old}"
    issued = subscribe(receiver.url, ["webhook.pinged"])
    sub = issued.subscription
    assert Subscription.objects.get().secret_key_id == "old"
    settings.SANDBOX_SECRETS_KEYS = f"new:{new},old:{old}"
    assert commands.reseal_all() == (1, [])
    assert commands.reseal_all() == (0, [])  # idempotent
    row = Subscription.objects.get()
    assert row.secret_key_id == "new" and row.secret_version == 1
    event = Event.objects.get(type="webhook.secret_reencrypted")
    assert event.payload["from_key"] == "old" and event.payload["to_key"] == "new"
    # The old key retired: the secret is still readable and signs as before.
    settings.SANDBOX_SECRETS_KEYS = f"new:{new}"
    commands.ping(Caller.for_user(sub.owner), sub)
    pump_until(lambda: receiver.requests, what="the ping")
    got = receiver.requests[0]
    assert signing.verify(issued.secret, got.body, got.headers["Sandbox-Signature"])


def test_a_secret_under_a_retired_key_fails_its_attempts_and_says_why(
    receiver, subscribe, pump_until, settings, fast
) -> None:
    settings.SANDBOX_SECRETS_KEYS = f"old:{base64.b64encode(os.urandom(32)).decode()}"
    sub = subscribe(receiver.url, ["webhook.pinged"]).subscription
    commands.ping(Caller.for_user(sub.owner), sub)
    settings.SANDBOX_SECRETS_KEYS = f"new:{base64.b64encode(os.urandom(32)).decode()}"
    attempt = pump_until(lambda: DeliveryAttempt.objects.first(), what="an attempt")
    assert "signing secret cannot be read" in attempt.error and receiver.requests == []
