"""Login limits that hold under parallel attempts, and lockout answers that do not tell which
usernames exist; source addresses counted as one holder's (IPv4-mapped, IPv6 /64)."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.contrib.auth.hashers import MD5PasswordHasher
from django.db import connection, connections
from django.test import Client, override_settings

from accounts import throttle
from accounts.authentication import ip_allowed
from audit.models import Event

PASSWORD = "pw-Long-enough-1"


def login(client: Client, username: str, password: str, address: str):
    return client.post(
        "/accounts/login/", {"username": username, "password": password}, REMOTE_ADDR=address
    )


def errors(response) -> str:
    text = response.content.decode()
    found = re.findall(r'<div class="errors" role="alert">(.*?)</div>', text, re.S)
    plain = re.sub(r"<[^>]+>", " ", " ".join(found))
    # The time a lock ends is the only part that may differ.
    return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d", "TIME", " ".join(plain.split()))


@pytest.fixture
def hashing(monkeypatch) -> list[str]:
    """Every password hash computed or checked, by kind."""
    calls: list[str] = []
    lock = threading.Lock()
    encode, verify = MD5PasswordHasher.encode, MD5PasswordHasher.verify

    def spy_encode(self, password, salt):
        with lock:
            calls.append("encode")
        return encode(self, password, salt)

    def spy_verify(self, password, encoded):
        with lock:
            calls.append("verify")
        return verify(self, password, encoded)

    monkeypatch.setattr(MD5PasswordHasher, "encode", spy_encode)
    monkeypatch.setattr(MD5PasswordHasher, "verify", spy_verify)
    return calls


@pytest.mark.django_db
@override_settings(SANDBOX_LOCKOUT_THRESHOLD=5)
def test_a_made_up_name_locks_like_a_real_one_with_the_same_answer_and_work(
    make_user, hashing
) -> None:
    make_user("operator", "real-name")
    answers: dict[str, list[str]] = {}
    hashes: dict[str, list[int]] = {}
    for name, address in (("real-name", "192.0.2.21"), ("made-up-name", "192.0.2.22")):
        client = Client()
        for _ in range(7):
            before = hashing.count("encode")
            answers.setdefault(name, []).append(errors(login(client, name, "wrong", address)))
            hashes.setdefault(name, []).append(hashing.count("encode") - before)
    assert answers["real-name"] == answers["made-up-name"]
    assert "This account is locked" in answers["made-up-name"][-1]
    assert "Please enter a correct username" in answers["made-up-name"][0]
    # Every attempt, locked or not, costs one password hash for both names (checking one is
    # hashing the guess: the MD5 hasher's verify encodes).
    assert hashes["real-name"] == hashes["made-up-name"] == [1] * 7
    # The made-up name has no account events and no login state.
    assert not Event.objects.filter(aggregate_id="made-up-name").exists()
    assert Event.objects.filter(type="auth.locked_out", aggregate_id="real-name").count() == 1


@pytest.mark.django_db
@override_settings(SANDBOX_LOCKOUT_THRESHOLD=2, SANDBOX_LOCKOUT_S=60)
def test_the_lock_of_a_made_up_name_ends_with_its_time(monkeypatch) -> None:
    client = Client()
    for _ in range(2):
        login(client, "nobody-here", "wrong", "192.0.2.23")
    assert "locked" in errors(login(client, "nobody-here", "wrong", "192.0.2.23"))
    until = throttle.name_locked_until("nobody-here")
    assert until is not None
    clock = throttle._clock
    monkeypatch.setattr(throttle, "_clock", lambda: clock() + 61)
    later = throttle.datetime.fromtimestamp(clock() + 61, tz=throttle.UTC)
    assert until < later
    assert throttle.name_locked_until("nobody-here", now=later) is None


def _parallel(n: int, attempt) -> list:
    """Run ``attempt(i)`` in ``n`` threads at once, each with its own database connection."""
    start = threading.Barrier(n)

    def run(i: int):
        try:
            start.wait(timeout=30)
            return attempt(i)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


pg_only = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="parallel logins need a server database (SQLite serves from one web process)",
)


@pg_only
@pytest.mark.django_db(transaction=True)
@override_settings(SANDBOX_LOCKOUT_THRESHOLD=5)
def test_parallel_wrong_passwords_from_many_addresses_check_at_most_the_threshold(
    make_user, hashing
) -> None:
    make_user("operator", "target")
    hashing.clear()
    answers = _parallel(
        30,
        lambda i: login(
            Client(raise_request_exception=False), "target", f"wrong-{i}", f"198.51.100.{i + 1}"
        ),
    )
    assert [r.status_code for r in answers] == [200] * 30
    assert hashing.count("verify") == 5
    # The lock states the checked failures only: attempts refused because the threshold was
    # taken already by attempts still being checked are recorded (reason locked) but uncounted.
    lock = Event.objects.get(type="auth.locked_out", aggregate_id="target")
    assert lock.payload["failures"] == 5
    checked = Event.objects.filter(
        type="auth.login_failed", aggregate_id="target", data__contains="bad_credentials"
    )
    assert checked.count() == 5


@pg_only
@pytest.mark.django_db(transaction=True)
@override_settings(SANDBOX_LOGIN_SOURCE_FAILURES=20, SANDBOX_LOCKOUT_THRESHOLD=1000)
def test_parallel_failures_from_one_address_hash_at_most_its_limit(db, hashing) -> None:
    _parallel(60, lambda i: login(Client(), f"nobody-{i}", "guess", "203.0.113.77"))
    assert len(hashing) == 20
    throttled = Event.objects.get(type="auth.login_throttled")
    assert throttled.payload["failures"] == 20


@pytest.mark.django_db
@override_settings(SANDBOX_LOGIN_SOURCE_FAILURES=3)
def test_an_ipv4_mapped_address_is_throttled_as_its_ipv4_address(db) -> None:
    client = Client()
    for address in ("192.0.2.50", "::ffff:192.0.2.50", "192.0.2.50"):
        login(client, "nobody", "guess", address)
    assert throttle.refused_until("192.0.2.50") is not None
    assert throttle.refused_until("::ffff:192.0.2.50") is not None
    assert "Too many failed logins" in errors(login(client, "x", "y", "::ffff:192.0.2.50"))


@pytest.mark.django_db
@override_settings(SANDBOX_LOGIN_SOURCE_FAILURES=3, SANDBOX_LOGIN_SOURCE_IPV6_PREFIX=64)
def test_an_ipv6_holder_cannot_rotate_past_the_limit_within_its_64(db) -> None:
    client = Client()
    for host in (1, 2, 3):
        login(client, "nobody", "guess", f"2001:db8:1:2::{host}")
    assert "Too many failed logins" in errors(login(client, "x", "y", "2001:db8:1:2:ffff::9"))
    # Another /64 is another holder.
    assert throttle.refused_until("2001:db8:1:3::1") is None
    assert Event.objects.get(type="auth.login_throttled").aggregate_id == "2001:db8:1:2::/64"


def test_token_networks_match_ipv4_mapped_addresses() -> None:
    assert ip_allowed("::ffff:1.2.3.4", ["1.2.3.0/24"])
    assert not ip_allowed("::ffff:1.2.4.4", ["1.2.3.0/24"])
    assert ip_allowed("1.2.3.4", ["1.2.3.0/24"])
    assert not ip_allowed("2001:db8::1", ["1.2.3.0/24"])
