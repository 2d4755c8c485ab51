"""Failed logins are limited per source address before any password is hashed; failures for
unknown usernames are aggregated; admins can unlock a locked account (API and shell)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.hashers import MD5PasswordHasher
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client, override_settings
from rest_framework.test import APIClient

from accounts import commands, throttle
from accounts.models import LoginState
from audit.models import Event

pytestmark = pytest.mark.django_db

PASSWORD = "pw-Long-enough-1"
ATTACKER = "203.0.113.66"
ADMIN_DESK = "198.51.100.7"
LIMIT = 20


def login(client: Client, username: str, password: str, address: str = ATTACKER, path: str = ""):
    return client.post(
        path or "/accounts/login/",
        {"username": username, "password": password},
        REMOTE_ADDR=address,
    )


@pytest.fixture
def hashing(monkeypatch) -> list[str]:
    """Every password hash computed or checked, by kind."""
    calls: list[str] = []
    encode, verify = MD5PasswordHasher.encode, MD5PasswordHasher.verify

    def spy_encode(self, password, salt):
        calls.append("encode")
        return encode(self, password, salt)

    def spy_verify(self, password, encoded):
        calls.append("verify")
        return verify(self, password, encoded)

    monkeypatch.setattr(MD5PasswordHasher, "encode", spy_encode)
    monkeypatch.setattr(MD5PasswordHasher, "verify", spy_verify)
    return calls


@override_settings(SANDBOX_LOGIN_SOURCE_FAILURES=LIMIT)
def test_300_random_username_failures_add_a_bounded_number_of_events(hashing) -> None:
    client = Client()
    before = Event.objects.count()
    for _ in range(300):
        response = login(client, f"u-{uuid.uuid4().hex[:10]}", "guess-123456")
        assert response.status_code == 200
    added = Event.objects.filter(position__gt=0).count() - before
    assert added == 2
    first = Event.objects.get(type="auth.unknown_user_failed")
    throttled = Event.objects.get(type="auth.login_throttled")
    assert first.aggregate_id == throttled.aggregate_id == ATTACKER
    assert throttled.payload["failures"] == LIMIT
    assert throttled.payload["unknown_user_failures"] == LIMIT
    assert not Event.objects.filter(type="auth.login_failed").exists()
    assert not LoginState.objects.exists()
    # Only the attempts before the limit reached a hasher (Django hashes for unknown names too).
    assert len(hashing) == LIMIT
    assert "Too many failed logins from your address" in response.content.decode()


@override_settings(SANDBOX_LOGIN_SOURCE_FAILURES=LIMIT)
def test_a_throttled_address_is_refused_before_any_hashing_even_with_a_right_password(
    make_user, hashing
) -> None:
    make_user("operator", "nina")
    client = Client()
    for i in range(LIMIT):
        login(client, f"nobody{i}", "guess-123456")
    hashing.clear()
    events = Event.objects.count()
    for path in ("/accounts/login/", "/admin/login/"):
        response = login(client, "nina", PASSWORD, path=path)
        assert response.status_code == 200
    assert hashing == []
    assert Event.objects.count() == events
    assert "_auth_user_id" not in client.session
    # Another address is not affected.
    assert login(Client(), "nina", PASSWORD, address=ADMIN_DESK).status_code == 302


@override_settings(SANDBOX_LOGIN_SOURCE_FAILURES=LIMIT, SANDBOX_LOCKOUT_THRESHOLD=5)
def test_failures_for_known_accounts_count_against_the_address_too(make_user) -> None:
    for i in range(LIMIT // 5):
        make_user("viewer", f"v{i}")
    client = Client()
    for i in range(LIMIT // 5):
        for _ in range(5):
            login(client, f"v{i}", "wrong-password")
    assert Event.objects.filter(type="auth.locked_out").count() == LIMIT // 5
    assert Event.objects.get(type="auth.login_throttled").payload["unknown_user_failures"] == 0
    assert throttle.refused_until(ATTACKER) is not None


@override_settings(SANDBOX_LOCKOUT_THRESHOLD=5)
def test_an_admin_locked_out_by_an_attacker_is_unlocked_through_the_api(
    make_user, token_client
) -> None:
    boss = make_user("admin", "boss")
    for _ in range(5):
        login(Client(), "boss", "wrong-password")
    assert commands.is_locked("boss")
    # The lock is on password logins: the admin's API token still works, and unlocks.
    api = token_client(boss)
    response = api.post(f"/api/v1/users/{boss.pk}/unlock/")
    assert response.status_code == 200 and response.json() == {"username": "boss", "unlocked": True}
    unlocked = Event.objects.get(type="auth.unlocked")
    assert (unlocked.aggregate_id, unlocked.actor_name, unlocked.channel) == ("boss", "boss", "api")
    assert login(Client(), "boss", PASSWORD, address=ADMIN_DESK).status_code == 302
    # Nothing to unlock: a 409, and nothing recorded.
    again = api.post(f"/api/v1/users/{boss.pk}/unlock/")
    assert again.status_code == 409 and "not locked" in again.json()["detail"]
    assert Event.objects.filter(type="auth.unlocked").count() == 1


def test_only_user_managers_may_unlock(make_user) -> None:
    target = make_user("viewer", "target")
    client = APIClient()
    client.force_authenticate(make_user("operator"))
    assert client.post(f"/api/v1/users/{target.pk}/unlock/").status_code == 403
    assert not Event.objects.filter(type="auth.unlocked").exists()


@override_settings(SANDBOX_LOCKOUT_THRESHOLD=2)
def test_the_shell_unlock_command_is_an_event(make_user) -> None:
    make_user("operator", "olaf")
    login(Client(), "olaf", "bad-one")
    login(Client(), "olaf", "bad-two")
    assert commands.is_locked("olaf")
    out = io.StringIO()
    call_command("unlock_account", "olaf", stdout=out)
    assert "unlocked olaf" in out.getvalue() and commands.is_locked("olaf") is None
    event = Event.objects.get(type="auth.unlocked")
    assert (event.channel, event.actor_name) == ("shell", "unlock_account")
    with pytest.raises(CommandError, match="not locked"):
        call_command("unlock_account", "olaf", stdout=io.StringIO())
    assert Event.objects.filter(type="auth.unlocked").count() == 1


def test_with_redis_every_web_process_sees_the_same_counters(settings) -> None:
    if not django_settings.REDIS_URL:
        pytest.skip("the embedded default serves from one web process (in-memory cache)")
    assert "RedisCache" in settings.CACHES["default"]["BACKEND"]
    # Another process counts failures from an address; this one sees the address refused.
    code = (
        "import django; django.setup()\n"
        "from django.test import override_settings\n"
        "from accounts import throttle\n"
        f"throttle.NAMESPACE = {throttle.NAMESPACE!r}\n"
        "with override_settings(SANDBOX_LOGIN_SOURCE_FAILURES=3):\n"
        "    for _ in range(3): t = throttle.note_failure('192.0.2.99', unknown_user=True)\n"
        "print(t.refused_until is not None)\n"
    )
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="sandbox_site.settings")
    result = subprocess.run(  # noqa: S603
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=django_settings.BASE_DIR,
    )
    assert result.stdout.strip().endswith("True"), result.stderr
    assert throttle.refused_until("192.0.2.99") is not None


@override_settings(SANDBOX_LOGIN_SOURCE_FAILURES=3)
def test_no_refusal_without_its_event(monkeypatch) -> None:
    from audit.actor import Actor

    guesser = Actor(kind="anonymous", channel="dashboard", source_ip=ATTACKER)
    append = commands.store.append

    def failing(aggregate_type, aggregate_id, type, *args, **kwargs):
        if type == "auth.login_throttled":
            raise RuntimeError("event store unavailable")
        return append(aggregate_type, aggregate_id, type, *args, **kwargs)

    monkeypatch.setattr(commands.store, "append", failing)
    commands.record_login_failure(guesser, "nobody1", "bad_credentials")
    commands.record_login_failure(guesser, "nobody2", "bad_credentials")
    with pytest.raises(RuntimeError):
        commands.record_login_failure(guesser, "nobody3", "bad_credentials")
    assert throttle.refused_until(ATTACKER) is None
    monkeypatch.setattr(commands.store, "append", append)
    commands.record_login_failure(guesser, "nobody4", "bad_credentials")
    assert throttle.refused_until(ATTACKER) is not None
    assert Event.objects.get(type="auth.login_throttled").payload["failures"] == 4


@override_settings(SANDBOX_LOGIN_SOURCE_FAILURES=100, SANDBOX_LOGIN_SOURCE_WINDOW_S=300)
def test_the_next_window_reports_the_unknown_name_failures_left_uncounted(monkeypatch) -> None:
    from audit.actor import Actor

    guesser = Actor(kind="anonymous", channel="dashboard", source_ip=ATTACKER)
    start = 1_000_000 * 300.0
    for offset, tries in ((0, 5), (300, 1), (600, 1)):
        monkeypatch.setattr(throttle, "_clock", lambda t=start + offset: t)
        for i in range(tries):
            commands.record_login_failure(guesser, f"nobody-{offset}-{i}", "bad_credentials")
    events = list(Event.objects.filter(type="auth.unknown_user_failed").order_by("position"))
    assert [e.payload.get("previous_window_unknown_user_failures") for e in events] == [
        None,
        5,
        None,
    ]
