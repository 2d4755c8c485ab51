"""Token pepper rotation: tokens hashed with the old pepper keep working (and move to the new one
at their next use) until the old pepper is retired; new tokens use the new pepper's key id."""

from __future__ import annotations

import stat
from typing import Any

import pytest
from django.core.management.base import CommandError
from rest_framework.test import APIClient

from accounts.models import APIToken
from audit.models import Event

pytestmark = pytest.mark.django_db


def bearer(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def key_of(token: str) -> str:
    return token.split("_")[1]


def test_a_rotation_makes_a_new_pepper_and_records_its_key_id_only(
    secrets_dir: Any, manage: Any, settings: Any
) -> None:
    out = manage("rotate_key", "token-pepper")
    assert "v1 -> v2" in out and "restart" in out
    path = secrets_dir / "token_pepper_v2"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    event = Event.objects.get(type="key.rotated")
    assert event.payload == {
        "kind": "token-pepper",
        "key_id": "v2",
        "previous_key_id": "v1",
        "restart": True,
    }
    for pepper in (path.read_text(), settings.SANDBOX_TOKEN_PEPPERS[1]):
        assert pepper not in event.data


def test_an_old_token_works_after_rotation_and_moves_to_the_new_pepper(
    secrets_dir: Any, manage: Any, restart: Any, make_user: Any, issue_token: Any
) -> None:
    user = make_user("operator")
    old = issue_token(user)
    assert APIToken.objects.get(key=key_of(old)).pepper_version == 1
    manage("rotate_key", "token-pepper")
    restart()

    assert bearer(old).get("/api/v1/me/").status_code == 200
    row = APIToken.objects.get(key=key_of(old))
    assert row.pepper_version == 2
    rehashed = Event.objects.get(type="token.rehashed")
    assert rehashed.payload["pepper"] == "v2" and rehashed.payload["previous_pepper"] == "v1"
    assert row.digest not in rehashed.data
    # Re-hashed once; from then on it no longer depends on v1 and outlives its retirement.
    assert bearer(old).get("/api/v1/me/").status_code == 200
    assert Event.objects.filter(type="token.rehashed").count() == 1
    manage("retire_key", "token-pepper", "v1")
    restart()
    assert bearer(old).get("/api/v1/me/").status_code == 200

    new = issue_token(user)
    assert APIToken.objects.get(key=key_of(new)).pepper_version == 2


def test_retiring_a_pepper_that_live_tokens_use_is_refused_then_forced_and_they_stop(
    secrets_dir: Any, manage: Any, restart: Any, make_user: Any, issue_token: Any
) -> None:
    user = make_user("operator")
    old = issue_token(user)
    manage("rotate_key", "token-pepper")
    restart()
    with pytest.raises(CommandError, match="1 still depend on token-pepper v1"):
        manage("retire_key", "token-pepper", "v1")
    assert (secrets_dir / "token_pepper_v1").exists()
    assert not Event.objects.filter(type="key.retired").exists()
    # Still good until retired (not used since the rotation, so still on v1).
    assert APIToken.objects.get(key=key_of(old)).pepper_version == 1

    manage("retire_key", "token-pepper", "v1", "--force")
    assert not (secrets_dir / "token_pepper_v1").exists()
    retired = Event.objects.get(type="key.retired")
    assert retired.payload == {"kind": "token-pepper", "key_id": "v1", "still_in_use": 1}
    restart()
    response = bearer(old).get("/api/v1/me/")
    assert response.status_code == 401
    rejected = Event.objects.get(type="auth.token_rejected")
    assert rejected.payload["reason"] == "pepper_retired"
    assert APIToken.objects.get(key=key_of(old)).pepper_version == 1  # not re-hashed
    assert bearer(issue_token(user)).get("/api/v1/me/").status_code == 200


def test_the_current_pepper_and_unknown_ones_cannot_be_retired(
    secrets_dir: Any, manage: Any
) -> None:
    with pytest.raises(CommandError, match="v1 is the current token-pepper: rotate first"):
        manage("retire_key", "token-pepper", "v1")
    for bad in ("v7", "1", "../token_pepper_v1", "v0"):
        with pytest.raises(CommandError, match="has no key"):
            manage("retire_key", "token-pepper", bad)
    assert (secrets_dir / "token_pepper_v1").exists()
    assert not Event.objects.filter(type__startswith="key.").exists()


def test_a_pepper_from_the_environment_is_retired_there(
    secrets_dir: Any, manage: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("SANDBOX_TOKEN_PEPPER_V1", "from-the-environment-" + "x" * 30)
    assert "v1 -> v2" in manage("rotate_key", "token-pepper")
    with pytest.raises(CommandError, match="comes from the environment"):
        manage("retire_key", "token-pepper", "v1")


def test_a_wrong_secret_is_still_a_bad_secret_after_rotation(
    secrets_dir: Any, manage: Any, restart: Any, make_user: Any, issue_token: Any
) -> None:
    token = issue_token(make_user("operator"))
    manage("rotate_key", "token-pepper")
    restart()
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert bearer(forged).get("/api/v1/me/").status_code == 401
    assert Event.objects.get(type="auth.token_rejected").payload["reason"] == "bad_secret"
    assert APIToken.objects.get(key=key_of(token)).pepper_version == 1
    assert not Event.objects.filter(type="token.rehashed").exists()


def test_list_keys_shows_key_ids_and_what_depends_on_them_never_a_key(
    secrets_dir: Any, manage: Any, restart: Any, settings: Any, make_user: Any, issue_token: Any
) -> None:
    issue_token(make_user("operator"))
    manage("rotate_key", "token-pepper")
    manage("rotate_key", "django-secret")
    restart()
    listing = manage("list_keys")
    assert "  v1: file, 1 live tokens" in listing
    assert "  v2 (current): file, 0 live tokens" in listing
    assert "  v1 (fallback): file" in listing and "  v2 (current): file" in listing
    assert "  hmac-1 (current): file, 0 digests" in listing
    for secret in (
        *settings.SANDBOX_TOKEN_PEPPERS.values(),
        settings.SECRET_KEY,
        *settings.SECRET_KEY_FALLBACKS,
    ):
        assert secret not in listing
