"""Ed25519 digests: signed by default, verifiable, rotatable; HMAC digests stay verifiable."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from audit import digests, keys, signing
from audit.actor import Actor
from audit.commands import sign_digest
from audit.models import Digest, DigestKey
from audit.verify import verify_store
from tests.audit.helpers import append_user_events

pytestmark = pytest.mark.django_db
SHELL = Actor.system(channel="shell", name="tests")


def test_new_digests_are_ed25519_and_verify(settings) -> None:
    append_user_events("1", 3)
    digest = sign_digest(SHELL)
    assert digest.algorithm == "ed25519" and digest.key_id == "ed25519-1"
    public = DigestKey.objects.get(key_id="ed25519-1").public_key
    assert signing.verify(public, digest.document, digest.signature)
    assert not signing.verify(
        public, digest.document.replace('"end_position":3', '"end_position":4'), digest.signature
    )
    assert (settings.SANDBOX_DIGEST_ED25519_DIR / "ed25519-1.pem").stat().st_mode & 0o777 == 0o600
    assert verify_store().ok


def test_rotation_keeps_old_digests_verifiable(settings) -> None:
    append_user_events("1", 2)
    old = sign_digest(SHELL)
    settings.SANDBOX_DIGEST_ED25519_CURRENT = "ed25519-2"
    append_user_events("2", 2)
    new = sign_digest(SHELL)
    assert (old.key_id, new.key_id) == ("ed25519-1", "ed25519-2")
    infos = {k.key_id: k for k in keys.public_key_infos()}
    assert infos["ed25519-2"].current and not infos["ed25519-1"].current
    # The old private key is destroyed; its public half (file and registry) still verifies.
    (settings.SANDBOX_DIGEST_ED25519_DIR / "ed25519-1.pem").unlink()
    report = verify_store()
    assert report.ok, report.problem
    assert report.digests_checked == 2


def test_a_retired_key_given_only_as_public_key_verifies(settings, tmp_path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    seed = private.private_bytes_raw()
    import base64

    settings.SANDBOX_DIGEST_ED25519_KEYS = f"env-1:{base64.b64encode(seed).decode()}"
    settings.SANDBOX_DIGEST_ED25519_CURRENT = "env-1"
    append_user_events("1", 2)
    digest = sign_digest(SHELL)
    assert digest.key_id == "env-1"
    pub = signing.public_b64(private.public_key())
    assert digests.verify_signature(
        "ed25519", "env-1", digest.document, digest.signature, {"env-1": pub}
    )


def test_a_different_key_under_a_registered_id_is_refused(settings, tmp_path) -> None:
    append_user_events("1", 2)
    sign_digest(SHELL)
    settings.SANDBOX_DIGEST_ED25519_DIR = tmp_path / "other-host"
    append_user_events("2", 2)
    with pytest.raises(ImproperlyConfigured, match="registered with fingerprint"):
        sign_digest(SHELL)
    assert Digest.objects.count() == 1


def test_hmac_digests_still_sign_and_verify_beside_ed25519(settings) -> None:
    settings.SANDBOX_DIGEST_ALGORITHM = "hmac-sha256"
    append_user_events("1", 2)
    hm = sign_digest(SHELL)
    settings.SANDBOX_DIGEST_ALGORITHM = "ed25519"
    append_user_events("2", 2)
    ed = sign_digest(SHELL)
    assert (hm.algorithm, ed.algorithm) == ("hmac-sha256", "ed25519")
    assert ed.start_prev_hash == hm.end_hash
    assert verify_store().ok


def test_a_forged_ed25519_signature_is_found(tamper) -> None:
    from django.db import connection

    append_user_events("1", 2)
    sign_digest(SHELL)
    with tamper(), connection.cursor() as cur:
        cur.execute("UPDATE audit_digest SET signature = %s", ["A" * 88])
    report = verify_store()
    assert not report.ok and "bad signature" in str(report.problem)


def test_bad_key_configuration_is_reported(settings) -> None:
    settings.SANDBOX_DIGEST_ED25519_KEYS = "no-colon"
    with pytest.raises(ImproperlyConfigured, match="expected 'id:base64"):
        keys.current_key()
    settings.SANDBOX_DIGEST_ED25519_KEYS = "k1:bm90LWEta2V5"
    with pytest.raises(ImproperlyConfigured, match="32 bytes"):
        keys.current_key()
