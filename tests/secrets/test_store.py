"""The secrets store: values encrypted at rest under keys with ids, events that never hold a
value, and rotation that leaves every secret readable and retired keys useless."""

from __future__ import annotations

import base64
import os

import pytest
from django.core.exceptions import ImproperlyConfigured, PermissionDenied, ValidationError
from django.core.management import call_command
from django.db import connection

from accounts.caller import Caller
from audit.models import Event
from secretstore import commands, crypto, guests, tasks
from secretstore.models import Secret
from vms.task_guard import ALLOWED_TASKS

VALUE = "s3cr3t-value-for-the-store"


def key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def keys(settings):
    old, new = key(), key()
    settings.SANDBOX_SECRETS_KEYS = f"old:{old}"
    return {"old": old, "new": new}


def caller_of(user) -> Caller:
    return Caller.for_user(user)


def all_text() -> str:
    """Every table's rows, as text (what a database dump would hold)."""
    out = []
    with connection.cursor() as cur:
        for table in connection.introspection.table_names():
            cur.execute(f'SELECT * FROM "{table}"')  # noqa: S608 (names from the catalog)
            out.extend(repr(row) for row in cur.fetchall())
    return "\n".join(out)


@pytest.mark.django_db
def test_a_value_is_stored_encrypted_and_bound_to_its_row(make_user, keys) -> None:
    alice = make_user("operator", "alice")
    secret = commands.create_secret(caller_of(alice), name="API_KEY", value=VALUE)
    row = Secret.objects.get(pk=secret.pk)
    assert row.key_id == "old"
    assert VALUE.encode() not in bytes(row.ciphertext)
    assert commands.open_value(row) == VALUE.encode()
    # Another row's ciphertext does not open under this row's binding.
    other = commands.create_secret(caller_of(alice), name="OTHER", value="another-one")
    row.ciphertext, row.nonce = other.ciphertext, other.nonce
    with pytest.raises(crypto.DecryptionFailed):
        commands.open_value(row)


@pytest.mark.django_db
def test_events_record_name_owner_version_and_hmac_never_the_value(make_user, keys) -> None:
    alice = make_user("operator", "alice")
    secret = commands.create_secret(caller_of(alice), name="API_KEY", value=VALUE)
    secret = commands.update_secret(caller_of(alice), secret, value=VALUE + "-2")
    commands.delete_secret(caller_of(alice), secret)
    events = list(Event.objects.filter(aggregate_type="secret").order_by("position"))
    assert [e.type for e in events] == ["secret.created", "secret.updated", "secret.deleted"]
    assert events[0].payload["name"] == "API_KEY"
    assert events[0].payload["owner"] == "user:alice"
    assert [e.payload["version"] for e in events] == [1, 2, 2]
    assert events[0].payload["hmac"] == crypto.fingerprint(VALUE.encode())
    assert events[1].payload["hmac"] == crypto.fingerprint((VALUE + "-2").encode())
    assert VALUE not in all_text()


@pytest.mark.django_db
def test_names_and_values_are_validated_and_nothing_changes(make_user, keys) -> None:
    alice = make_user("operator", "alice")
    before = Event.objects.count()
    for name, value in [("1BAD", VALUE), ("with space", VALUE), ("OK", "abc"), ("OK", "a\0bcd")]:
        with pytest.raises(ValidationError):
            commands.create_secret(caller_of(alice), name=name, value=value)
    with pytest.raises(ValidationError):
        commands.create_secret(caller_of(alice), name="BIG", value="x" * 70000)
    commands.create_secret(caller_of(alice), name="DUP", value=VALUE)
    with pytest.raises(ValidationError):
        commands.create_secret(caller_of(alice), name="DUP", value=VALUE)
    assert Event.objects.count() == before + 1
    assert Secret.objects.count() == 1


@pytest.mark.django_db
def test_a_group_secret_is_used_by_its_members_only(make_user, keys) -> None:
    alice, bob = make_user("operator", "alice"), make_user("operator", "bob")
    viewer = make_user("viewer", "val")
    commands.create_secret(caller_of(alice), name="SHARED", value=VALUE, group="operator")
    with pytest.raises(ValidationError):
        commands.create_secret(caller_of(alice), name="X", value=VALUE, group="admin")
    got = guests.resolve(bob, [{"name": "SHARED", "env": "S"}], caller=caller_of(bob))
    assert got[0].value == VALUE.encode() and got[0].owner == "group:operator"
    with pytest.raises(ValidationError):
        guests.resolve(viewer, [{"name": "SHARED", "env": "S"}])
    with pytest.raises(PermissionDenied):
        guests.resolve(viewer, [{"name": "SHARED", "env": "S"}], caller=caller_of(viewer))


@pytest.mark.django_db
def test_another_users_secret_cannot_be_changed_or_used(make_user, keys) -> None:
    alice, bob = make_user("operator", "alice"), make_user("operator", "bob")
    secret = commands.create_secret(caller_of(alice), name="MINE", value=VALUE)
    with pytest.raises(PermissionDenied):
        commands.update_secret(caller_of(bob), secret, value="other-value")
    with pytest.raises(PermissionDenied):
        commands.delete_secret(caller_of(bob), secret)
    with pytest.raises(ValidationError):
        guests.resolve(bob, [{"name": "MINE", "env": "X"}], caller=caller_of(bob))


@pytest.mark.django_db
def test_rotation_reencrypts_everything_and_retired_keys_stop_decrypting(
    make_user, keys, settings
) -> None:
    alice = make_user("operator", "alice")
    values = {f"S{i}": f"value-number-{i}-xyz" for i in range(5)}
    for name, value in values.items():
        commands.create_secret(caller_of(alice), name=name, value=value)
    before = {s.pk: (bytes(s.nonce), bytes(s.ciphertext)) for s in Secret.objects.all()}
    # The new key becomes current; the old one stays readable until the rotation is done.
    settings.SANDBOX_SECRETS_KEYS = f"new:{keys['new']},old:{keys['old']}"
    lines: list[str] = []
    call_command("rotate_secrets", stdout=_Lines(lines))
    assert any("5/5" in line for line in lines), lines
    assert set(Secret.objects.values_list("key_id", flat=True)) == {"new"}
    # Retire the old key: every secret still reads, and the old ciphertexts no longer decrypt.
    settings.SANDBOX_SECRETS_KEYS = f"new:{keys['new']}"
    for secret in Secret.objects.all():
        assert commands.open_value(secret) == values[secret.name].encode()
        nonce, ciphertext = before[secret.pk]
        with pytest.raises(crypto.UnknownKey):
            crypto.keyring().open(crypto.Sealed("old", nonce, ciphertext), secret.aad)
    kinds = list(Event.objects.filter(type__startswith="secret").values_list("type", flat=True))
    assert kinds.count("secret.reencrypted") == 5
    assert "secrets.rotation_completed" in kinds
    assert all("value-number" not in e.data for e in Event.objects.all())
    # Run again: nothing left to do.
    report = commands.reencrypt_all()
    assert (report.total, report.reencrypted) == (0, 0)


@pytest.mark.django_db
def test_a_rotation_with_the_old_key_already_retired_reports_what_it_could_not_read(
    make_user, keys, settings
) -> None:
    alice = make_user("operator", "alice")
    commands.create_secret(caller_of(alice), name="LOST", value=VALUE)
    settings.SANDBOX_SECRETS_KEYS = f"new:{keys['new']}"
    report = commands.reencrypt_all()
    assert report.reencrypted == 0 and len(report.failed or []) == 1
    assert Secret.objects.get().key_id == "old"


def test_malformed_key_settings_are_refused() -> None:
    for spec in ["", "nokey", "a:notbase64!!", f"a:{base64.b64encode(b'short').decode()}",
                 f"a:{key()},a:{key()}", f"bad id:{key()}"]:  # fmt: skip
        with pytest.raises(ImproperlyConfigured):
            crypto.parse_keys(spec)
    assert [k for k, _ in crypto.parse_keys(f"k2:{key()}, k1:{key()}")] == ["k2", "k1"]


class _Lines:
    def __init__(self, sink: list[str]) -> None:
        self.sink = sink

    def write(self, text: str) -> None:
        self.sink.append(text)

    def flush(self) -> None:
        pass


@pytest.mark.django_db
def test_the_background_task_is_allowed_and_reencrypts(make_user, keys, settings) -> None:
    assert "secretstore.tasks.reencrypt" in ALLOWED_TASKS
    commands.create_secret(caller_of(make_user("operator", "alice")), name="T", value=VALUE)
    settings.SANDBOX_SECRETS_KEYS = f"new:{keys['new']},old:{keys['old']}"
    assert tasks.reencrypt() == {"current_key": "new", "total": 1, "reencrypted": 1, "failed": 0}
    assert tasks.reencrypt()["total"] == 0
