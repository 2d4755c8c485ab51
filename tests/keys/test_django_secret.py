"""Django secret rotation: sessions made under the old secret keep working through
SECRET_KEY_FALLBACKS (HTTP and open websockets alike) until the old secret is retired; new ones
are made under the new secret."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import HASH_SESSION_KEY
from django.contrib.sessions.backends.db import SessionStore
from django.core import signing
from django.core.management.base import CommandError
from django.test import Client

from accounts.authentication import recheck_socket
from audit.models import Event

pytestmark = pytest.mark.django_db


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_a_rotation_keeps_the_old_secret_as_a_fallback_until_it_is_retired(
    secrets_dir: Any, manage: Any, restart: Any, settings: Any, make_user: Any
) -> None:
    user = make_user("operator")
    before = logged_in(user)
    signed = signing.dumps({"a": 1}, salt="test")
    old_secret = settings.SECRET_KEY

    assert "v1 -> v2" in manage("rotate_key", "django-secret")
    restart()
    assert settings.SECRET_KEY != old_secret and settings.SECRET_KEY_FALLBACKS == [old_secret]
    event = Event.objects.get(type="key.rotated")
    assert event.payload["kind"] == "django-secret" and event.payload["key_id"] == "v2"
    assert old_secret not in event.data and settings.SECRET_KEY not in event.data

    assert before.get("/api/v1/me/").json()["username"] == user.username
    assert signing.loads(signed, salt="test") == {"a": 1}
    after = logged_in(user)
    fresh = signing.dumps({"b": 2}, salt="test")

    manage("retire_key", "django-secret", "v1")
    assert not (secrets_dir / "django_secret_key").exists()
    assert Event.objects.get(type="key.retired").payload["key_id"] == "v1"
    restart()
    assert settings.SECRET_KEY_FALLBACKS == []
    with pytest.raises(signing.BadSignature):
        signing.loads(signed, salt="test")
    assert signing.loads(fresh, salt="test") == {"b": 2}
    assert after.get("/api/v1/me/").status_code == 200


def test_a_session_from_before_the_rotation_ends_when_the_old_secret_is_retired(
    secrets_dir: Any, manage: Any, restart: Any, make_user: Any
) -> None:
    user = make_user("operator")
    before = logged_in(user)
    manage("rotate_key", "django-secret")
    restart()
    # Not used during the fallback period: still carries the old secret's hash.
    manage("retire_key", "django-secret", "v1")
    restart()
    assert before.get("/api/v1/me/").status_code == 401


def test_an_open_websocket_of_a_session_from_before_the_rotation_stays_open_until_retirement(
    secrets_dir: Any, manage: Any, restart: Any, make_user: Any
) -> None:
    user = make_user("operator")
    session = SessionStore(logged_in(user).session.session_key)
    assert session.load()[HASH_SESSION_KEY] == user.get_session_auth_hash()
    manage("rotate_key", "django-secret")
    restart()
    assert session.load()[HASH_SESSION_KEY] != user.get_session_auth_hash()
    assert recheck_socket({"user": user, "session": session}) is None
    manage("retire_key", "django-secret", "v1")
    restart()
    assert recheck_socket({"user": user, "session": session}) == 4401


def test_the_current_secret_cannot_be_retired_nor_one_from_the_environment(
    secrets_dir: Any, manage: Any, monkeypatch: Any
) -> None:
    with pytest.raises(CommandError, match="v1 is the current django-secret"):
        manage("retire_key", "django-secret", "v1")
    monkeypatch.setenv("DJANGO_SECRET_KEY", "x" * 50)
    for args in (("rotate_key", "django-secret"), ("retire_key", "django-secret", "v1")):
        with pytest.raises(CommandError, match="comes from DJANGO_SECRET_KEY"):
            manage(*args)
    assert not Event.objects.filter(type__startswith="key.").exists()
    assert sorted(p.name for p in secrets_dir.iterdir() if p.name.startswith("django")) == [
        "django_secret_key"
    ]
