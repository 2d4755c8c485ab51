"""Where a webhook may go (SSRF): refused at subscribe time with a clear error and nothing
recorded, and refused again at delivery time, before anything is sent."""

from __future__ import annotations

import ipaddress

import pytest
from django.core.exceptions import PermissionDenied, ValidationError

from accounts.caller import Caller
from audit.models import Event
from webhooks import commands, targets
from webhooks.models import Delivery, DeliveryAttempt, Subscription

ALWAYS_REFUSED = [
    "http://169.254.169.254/latest/meta-data/",  # the cloud metadata service
    "http://169.254.10.1/",  # link-local
    "http://[fe80::1]/",
    "http://[fd00:ec2::254]/",  # AWS metadata over IPv6
    "http://100.100.100.200/",  # Alibaba Cloud metadata
    "http://0.0.0.0/",
    "http://[::]/",
    "http://224.0.0.1/",  # multicast
    "http://[ff02::1]/",
    "http://240.0.0.1/",  # reserved
    "http://255.255.255.255/",
    "http://[::ffff:169.254.169.254]/",  # IPv4-mapped
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
]
PRIVATE = [
    "http://127.0.0.1:8000/",
    "http://127.9.9.9/",
    "http://localhost/",
    "http://[::1]/",
    "http://10.1.2.3/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",  # carrier-grade NAT
    "http://[fd12:3456::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[2002:7f00:1::1]/",  # 6to4 of 127.0.0.1
    "http://192.0.2.1/",  # documentation: not routable
]
MALFORMED = [
    "ftp://example.com/",
    "file:///etc/passwd",
    "gopher://127.0.0.1:25/",
    "http://user:pass@example.com/",
    "http://example.com/#frag",
    "http:///nohost",
    "http://exa mple.com/",
    "http://example.com:0/",
    "http://example.com:99999/",
    "//example.com/",
    "",
    "http://" + "a" * 2100 + ".com/",
    "http://[fe80::1%25eth0]/",
]


@pytest.mark.parametrize("url", ALWAYS_REFUSED)
def test_link_local_metadata_multicast_and_reserved_are_refused_even_when_private_is_allowed(
    url,
) -> None:
    with pytest.raises(targets.TargetRefused):
        targets.check(url, allow_private=True)
    with pytest.raises(targets.TargetRefused):
        targets.check(url)


@pytest.mark.parametrize("url", PRIVATE)
def test_loopback_and_private_are_refused_unless_allowed(url) -> None:
    with pytest.raises(targets.TargetRefused, match="not allowed"):
        targets.check(url)
    target, addresses = targets.check(url, allow_private=True)
    assert addresses


@pytest.mark.parametrize("url", MALFORMED)
def test_malformed_urls_are_refused_with_a_reason(url) -> None:
    with pytest.raises(targets.TargetRefused) as info:
        targets.check(url, allow_private=True)
    assert str(info.value)


def test_global_addresses_are_allowed_and_the_target_keeps_its_host() -> None:
    for text in ("8.8.8.8", "2606:4700::1111", "1.1.1.1"):
        assert targets.classify(ipaddress.ip_address(text)) is None
    target = targets.parse("https://Hooks.Example.com:8443/in?x=1")
    assert target.host == "hooks.example.com" and target.port == 8443
    assert target.origin == "https://hooks.example.com:8443"
    assert target.host_header == "hooks.example.com:8443"
    assert target.url_for(ipaddress.ip_address("203.0.113.9")) == "https://203.0.113.9:8443/in?x=1"
    v6 = targets.parse("http://[2001:db8::1]/")
    assert v6.url_for(ipaddress.ip_address("2001:db8::1")) == "http://[2001:db8::1]:80/"
    assert v6.host_header == "[2001:db8::1]"


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url", ["http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:9/", "http://localhost/"]
)
def test_a_forbidden_target_is_refused_at_subscribe_time_and_nothing_is_recorded(
    make_user, url
) -> None:
    operator = make_user("operator", "alice")
    before = Event.objects.count()
    with pytest.raises(ValidationError) as info:
        commands.subscribe(Caller.for_user(operator), url=url, event_types=["vm.*"])
    assert "url" in info.value.message_dict
    assert "not allowed as a webhook target" in str(info.value)
    assert Event.objects.count() == before and not Subscription.objects.exists()


@pytest.mark.django_db
def test_only_admins_may_allow_private_targets_and_never_metadata(make_user) -> None:
    operator, admin = make_user("operator", "alice"), make_user("admin", "root")
    with pytest.raises(PermissionDenied):
        commands.subscribe(
            Caller.for_user(operator), url="http://127.0.0.1:9/", event_types=["vm.*"],
            allow_private=True,
        )  # fmt: skip
    with pytest.raises(ValidationError, match="metadata"):
        commands.subscribe(
            Caller.for_user(admin), url="http://169.254.169.254/", event_types=["vm.*"],
            allow_private=True,
        )  # fmt: skip
    issued = commands.subscribe(
        Caller.for_user(admin), url="http://127.0.0.1:9/", event_types=["vm.*"], allow_private=True
    )
    assert issued.subscription.allow_private
    assert Event.objects.get(type="webhook.subscribed").payload["allow_private"] is True


@pytest.mark.django_db
def test_an_owner_changing_the_url_loses_the_admins_private_permission(make_user) -> None:
    operator, admin = make_user("operator", "alice"), make_user("admin", "root")
    issued = commands.subscribe(
        Caller.for_user(operator), url="http://8.8.8.8/in", event_types=["vm.*"]
    )
    sub = commands.update(Caller.for_user(admin), issued.subscription, allow_private=True)
    assert sub.allow_private
    with pytest.raises(ValidationError, match="loopback"):
        commands.update(Caller.for_user(operator), sub, url="http://127.0.0.1:9/")
    sub = commands.update(Caller.for_user(operator), sub, url="http://1.1.1.1/in")
    assert not sub.allow_private


@pytest.mark.django_db
def test_the_target_is_checked_again_at_each_delivery_before_anything_is_sent(
    receiver, make_user, settings, pump_until
) -> None:
    """Allowed when it was made (the site allowed private targets), refused when delivered
    (the site no longer does): the attempt fails without a connection."""
    settings.SANDBOX_WEBHOOK_ALLOW_PRIVATE = True
    alice = make_user("operator", "alice")
    issued = commands.subscribe(Caller.for_user(alice), url=receiver.url, event_types=["webhook.*"])
    settings.SANDBOX_WEBHOOK_ALLOW_PRIVATE = False
    commands.ping(Caller.for_user(alice), issued.subscription)
    attempt = pump_until(lambda: DeliveryAttempt.objects.first(), what="an attempt")
    assert attempt.status_code is None and attempt.error.startswith("target refused: 127.0.0.1")
    assert receiver.requests == []
    assert Delivery.objects.get().status == "pending"  # retried: the site may allow it again


@pytest.mark.django_db
def test_a_name_is_resolved_and_the_checked_address_is_connected_to(
    receiver, subscribe, pump_until
) -> None:
    url = f"http://localhost:{receiver.port}/by-name"
    issued = subscribe(url, ["webhook.pinged"])
    sub = issued.subscription
    commands.ping(Caller.for_user(sub.owner), sub)
    pump_until(lambda: receiver.requests, what="the ping")
    assert receiver.requests[0].headers["Host"] == f"localhost:{receiver.port}"
    assert DeliveryAttempt.objects.get().address in ("127.0.0.1", "::1")
