"""Keys that the database cannot vouch for (issue 11, item 1).

Someone who can write to the database can add a key row, forge events, recompute the chain and
re-sign every digest with their own key. Verification trusts keys only from this host's
configuration (key files, settings, pinned fingerprints) and from rotation statements signed by
a key already trusted, so that forgery is refused; the key history itself is append-only.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import DatabaseError, connection, transaction

from audit import digests, keys, signing
from audit.actor import Actor
from audit.commands import sign_digest
from audit.integrity import verify_store
from audit.models import DigestKey, Event
from tests.audit.forgery import attacker_host, forge_event, sql
from tests.audit.helpers import append_user_events
from tests.conftest import acting_as_owner

pytestmark = pytest.mark.django_db
SHELL = Actor.system(channel="shell", name="tests")


@pytest.fixture(autouse=True)
def _own_keys(settings: Any, tmp_path: Path) -> None:
    settings.SANDBOX_DIGEST_ED25519_DIR = tmp_path / "keys"
    settings.SANDBOX_DIGEST_ED25519_KEYS = ""
    settings.SANDBOX_DIGEST_ED25519_PUBLIC_KEYS = ""
    settings.SANDBOX_DIGEST_TRUSTED_FINGERPRINTS = ""
    settings.SANDBOX_DIGEST_ED25519_CURRENT = "ed25519-1"
    settings.SANDBOX_DIGEST_ALGORITHM = "ed25519"


def run_verify() -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("verify_audit_chain", stdout=out, stderr=err)
    except SystemExit as exc:
        return int(exc.code), err.getvalue()
    return 0, out.getvalue()


def _signed_log() -> None:
    append_user_events("1", 5)
    sign_digest(SHELL)
    append_user_events("2", 3)
    sign_digest(SHELL)


def test_the_key_history_is_append_only() -> None:
    _signed_log()
    for statement in (
        "UPDATE audit_digestkey SET public_key = 'x'",
        "DELETE FROM audit_digestkey",
    ):
        # As the schema owner, whom the trigger refuses (the product's own role is refused by
        # its privileges already: test_db_roles.py).
        with acting_as_owner(), pytest.raises(DatabaseError, match="append-only"):
            with transaction.atomic(), connection.cursor() as cur:
                cur.execute(statement)
    assert DigestKey.objects.count() == 1


def test_an_attacker_key_with_every_digest_resigned_is_refused(
    settings: Any, tmp_path: Path, tamper: Any
) -> None:
    _signed_log()
    with tamper():
        forge_event(3, '{"i":99}')
        sql("DELETE FROM audit_digest")
    with attacker_host(settings, tmp_path):
        assert digests.sign_pending() is not None
        # On the forger's own host, which trusts the forger's key, all of it checks out.
        assert verify_store().ok
    assert DigestKey.objects.filter(key_id="evil").exists()

    code, text = run_verify()
    assert code == 1
    assert "key: untrusted digest key history" in text and "'evil'" in text
    last = Event.objects.order_by("-position").first()
    assert last.type == "audit.chain_verified" and last.payload["ok"] is False


def test_a_key_row_inserted_with_sql_fails_verification_even_unused() -> None:
    _signed_log()
    public = signing.public_b64(Ed25519PrivateKey.generate().public_key())
    sql(
        "INSERT INTO audit_digestkey (key_id, algorithm, public_key, fingerprint, created_at,"
        " statement, signed_by, signature) VALUES ('ed25519-9', 'ed25519', %s, %s, %s, '', '', '')",
        [public, signing.fingerprint(public), "2026-01-01T00:00:00+00:00"],
    )
    code, text = run_verify()
    assert code == 1 and "'ed25519-9'" in text and "not one you trust" in text
    with pytest.raises(keys.KeyTrustError):
        keys.trusted_public_keys()
    # Nor is it offered to auditors as a valid key.
    assert "ed25519-9" not in {k.key_id for k in keys.public_key_infos()}


def test_a_swapped_public_key_is_refused_without_advice_to_adopt_it(tamper: Any) -> None:
    _signed_log()
    forged = signing.public_b64(Ed25519PrivateKey.generate().public_key())
    with tamper():
        sql(
            "UPDATE audit_digestkey SET public_key = %s, fingerprint = %s WHERE key_id = %s",
            [forged, signing.fingerprint(forged), "ed25519-1"],
        )
    append_user_events("3", 1)
    with pytest.raises(ImproperlyConfigured) as refused:
        sign_digest(SHELL)
    message = str(refused.value)
    assert "copy the key file" not in message and "Do not replace either key" in message
    failed = Event.objects.filter(type="audit.digest_signing_failed").get()
    assert failed.payload["reason"] == "configuration"

    code, text = run_verify()
    assert code == 1 and "in this verifier's configuration" in text


def test_a_rotation_is_signed_by_the_previous_key_and_trusted_through_it(
    settings: Any, tmp_path: Path
) -> None:
    append_user_events("1", 2)
    sign_digest(SHELL)
    settings.SANDBOX_DIGEST_ED25519_CURRENT = "ed25519-2"
    append_user_events("2", 2)
    sign_digest(SHELL)
    first, second = DigestKey.objects.order_by("id")
    assert (second.key_id, second.signed_by) == ("ed25519-2", "ed25519-1")
    assert signing.verify(first.public_key, second.statement, second.signature)

    # A host configured with the first key's public half only trusts the second through it.
    settings.SANDBOX_DIGEST_ED25519_DIR = tmp_path / "verifier-only"
    settings.SANDBOX_DIGEST_ED25519_PUBLIC_KEYS = f"ed25519-1:{first.public_key}"
    assert set(keys.trusted_public_keys()) == {"ed25519-1", "ed25519-2"}
    report = verify_store()
    assert report.ok, report.problem


def test_a_key_that_no_trusted_key_signed_is_trusted_only_when_pinned(
    settings: Any, tmp_path: Path
) -> None:
    append_user_events("1", 2)
    sign_digest(SHELL)
    host_a_dir = settings.SANDBOX_DIGEST_ED25519_DIR
    first = DigestKey.objects.get()
    # Host B has a key of its own and trusts host A's key from its configuration.
    settings.SANDBOX_DIGEST_ED25519_DIR = tmp_path / "host-b"
    settings.SANDBOX_DIGEST_ED25519_CURRENT = "host-b-1"
    settings.SANDBOX_DIGEST_ED25519_PUBLIC_KEYS = f"ed25519-1:{first.public_key}"
    append_user_events("2", 2)
    sign_digest(SHELL)
    host_b = DigestKey.objects.get(key_id="host-b-1")
    assert host_b.signed_by == "host-b-1"  # host B could not sign with host A's key

    settings.SANDBOX_DIGEST_ED25519_DIR = host_a_dir
    settings.SANDBOX_DIGEST_ED25519_CURRENT = "ed25519-1"
    settings.SANDBOX_DIGEST_ED25519_PUBLIC_KEYS = ""
    report = verify_store()
    assert report.problem is not None and report.problem.kind == "key"
    assert "'host-b-1'" in report.problem.detail

    settings.SANDBOX_DIGEST_TRUSTED_FINGERPRINTS = host_b.fingerprint
    report = verify_store()
    assert report.ok, report.problem


def test_a_malformed_pinned_fingerprint_is_a_configuration_error(settings: Any) -> None:
    settings.SANDBOX_DIGEST_TRUSTED_FINGERPRINTS = "not-a-fingerprint"
    with pytest.raises(ImproperlyConfigured, match="not a SHA-256 hex fingerprint"):
        keys.trusted_public_keys()
