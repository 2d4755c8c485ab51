"""Digest key rotation: digests signed with a former key stay verifiable (an Ed25519 key's
public half outlives its retirement; an HMAC key that signed cannot be retired), new digests
carry the new key id, and the rotation is signed by the key it replaces."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.management.base import CommandError

from audit import commands as audit_commands
from audit import keys, signing, store
from audit.actor import Actor
from audit.commands import sign_digest
from audit.errors import EventStoreUnavailable
from audit.integrity import verify_store
from audit.models import Digest, DigestKey, Event
from tests.audit.helpers import append_user_events

pytestmark = pytest.mark.django_db
SHELL = Actor.system(channel="shell", name="tests")


def test_an_ed25519_rotation_signs_new_digests_with_the_new_key_and_old_ones_stay_verifiable(
    secrets_dir: Any, manage: Any, settings: Any
) -> None:
    settings.SANDBOX_DIGEST_ALGORITHM = "ed25519"
    append_user_events("1", 3)
    assert sign_digest(SHELL).key_id == "ed25519-1"

    assert "ed25519-1 -> ed25519-2" in manage("rotate_key", "digest-key")
    event = Event.objects.get(type="key.rotated")
    assert event.payload == {
        "kind": "digest-key",
        "key_id": "ed25519-2",
        "previous_key_id": "ed25519-1",
    }
    # Signed by the key it replaces, so verifiers that trust ed25519-1 trust ed25519-2.
    first, second = DigestKey.objects.order_by("id")
    assert (second.key_id, second.signed_by) == ("ed25519-2", "ed25519-1")
    assert signing.verify(first.public_key, second.statement, second.signature)
    # No restart: the next digest already uses it.
    append_user_events("2", 2)
    assert sign_digest(SHELL).key_id == "ed25519-2"

    manage("retire_key", "digest-key", "ed25519-1")
    key_dir = settings.SANDBOX_DIGEST_ED25519_DIR
    assert not (key_dir / "ed25519-1.pem").exists() and (key_dir / "ed25519-1.pub.pem").exists()
    assert Event.objects.get(type="key.retired").payload["key_id"] == "ed25519-1"
    private = (key_dir / "ed25519-2.pem").read_text()
    assert all(private not in e.data for e in Event.objects.filter(type__startswith="key."))

    report = verify_store()
    assert report.ok, report.problem
    assert report.digests_checked >= 2
    assert set(Digest.objects.values_list("key_id", flat=True)) == {"ed25519-1", "ed25519-2"}
    assert keys.current_key_id() == "ed25519-2"
    append_user_events("3", 1)
    assert sign_digest(SHELL).key_id == "ed25519-2"
    assert verify_store().ok


def test_the_signing_key_cannot_be_retired_nor_one_this_host_does_not_hold(
    secrets_dir: Any, manage: Any, settings: Any
) -> None:
    settings.SANDBOX_DIGEST_ALGORITHM = "ed25519"
    append_user_events("1", 1)
    sign_digest(SHELL)
    with pytest.raises(CommandError, match="ed25519-1 is the current signing key"):
        manage("retire_key", "digest-key", "ed25519-1")
    with pytest.raises(CommandError, match="holds no private digest key"):
        manage("retire_key", "digest-key", "ed25519-9")
    assert (settings.SANDBOX_DIGEST_ED25519_DIR / "ed25519-1.pem").exists()
    assert not Event.objects.filter(type__startswith="key.").exists()


def test_keys_pinned_by_configuration_are_rotated_there(
    secrets_dir: Any, manage: Any, settings: Any
) -> None:
    settings.SANDBOX_DIGEST_ALGORITHM = "ed25519"
    settings.SANDBOX_DIGEST_ED25519_CURRENT = "ed25519-1"
    with pytest.raises(CommandError, match="come from the environment"):
        manage("rotate_key", "digest-key")
    assert not Event.objects.filter(type__startswith="key.").exists()


def test_an_hmac_rotation_keeps_the_old_key_for_the_digests_it_signed(
    secrets_dir: Any, manage: Any, restart: Any, settings: Any
) -> None:
    settings.SANDBOX_DIGEST_ALGORITHM = "hmac-sha256"
    append_user_events("1", 2)
    assert sign_digest(SHELL).key_id == "hmac-1"
    assert "hmac-1 -> hmac-2" in manage("rotate_key", "digest-key")
    assert (secrets_dir / "digest_hmac_2").exists()
    restart()
    append_user_events("2", 2)
    assert sign_digest(SHELL).key_id == "hmac-2"
    report = verify_store()
    assert report.ok, report.problem
    with pytest.raises(CommandError, match="1 digests are signed with the HMAC key hmac-1"):
        manage("retire_key", "digest-key", "hmac-1")
    assert (secrets_dir / "digest_hmac_1").exists()
    assert not Event.objects.filter(type="key.retired").exists()


def test_a_digest_key_rotation_that_cannot_be_recorded_leaves_no_key_behind(
    secrets_dir: Any, settings: Any, monkeypatch: Any
) -> None:
    settings.SANDBOX_DIGEST_ALGORITHM = "ed25519"
    append_user_events("1", 1)
    sign_digest(SHELL)

    def unavailable(*args: Any, **kwargs: Any) -> None:
        raise EventStoreUnavailable("test: the store refuses")

    monkeypatch.setattr(store, "append", unavailable)
    with pytest.raises(EventStoreUnavailable):
        audit_commands.rotate_digest_key(SHELL)
    assert sorted(p.name for p in settings.SANDBOX_DIGEST_ED25519_DIR.iterdir()) == [
        "ed25519-1.pem",
        "ed25519-1.pub.pem",
    ]
    assert list(DigestKey.objects.values_list("key_id", flat=True)) == ["ed25519-1"]
    assert keys.current_key_id() == "ed25519-1"
