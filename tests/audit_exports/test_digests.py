"""Ed25519 digests: signed by default, verifiable, rotatable; HMAC digests stay verifiable."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from audit import digests, keys, signing
from audit.actor import Actor
from audit.commands import sign_digest
from audit.integrity import verify_store
from audit.models import Digest, DigestKey
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


# --- Issue 11: key trust and continuity, offline -------------------------------------------


def _bundle(path: Any, *, last: int | None = None) -> Any:
    """A bundle of 1..last (default: the newest signed position), without signing first."""
    from audit import bundle

    newest = Digest.objects.order_by("-end_position").values_list("end_position", flat=True)
    end = last if last is not None else newest.first()
    with path.open("wb") as fh:
        bundle.write_bundle(fh, first=1, last=end, name=path.name)
    return path


def _problems(path: Any, **kwargs: Any) -> list[str]:
    from audit.offline import verify_bundle

    return [str(p) for p in verify_bundle(str(path), **kwargs).problems]


def test_offline_an_attacker_key_with_every_digest_resigned_is_refused_without_trust(
    settings: Any, tmp_path: Any, tamper: Any
) -> None:
    from tests.audit.forgery import attacker_host, forge_event, sql

    append_user_events("1", 4)
    sign_digest(SHELL)
    append_user_events("2", 4)
    sign_digest(SHELL)
    honest = _bundle(tmp_path / "honest.zip")
    assert _problems(honest) == []
    with tamper():
        forge_event(2, '{"i":99}')
        sql("DELETE FROM audit_digest")
    with attacker_host(settings, tmp_path):
        digests.sign_pending()
        forged = _bundle(tmp_path / "forged.zip")  # made on the forger's host, as it would be
    problems = _problems(forged)
    assert any("key 'evil'" in p and "not one you trust" in p for p in problems), problems
    assert any("signed with key 'evil'" in p for p in problems), problems
    # An auditor who pins the honest key refuses it too; the honest bundle still verifies.
    honest_fp = DigestKey.objects.get(key_id="ed25519-1").fingerprint
    assert _problems(forged, trusted_fingerprints=[honest_fp])
    assert _problems(honest, trusted_fingerprints=[honest_fp]) == []


def test_offline_a_rotated_key_is_trusted_through_the_previous_key(
    settings: Any, tmp_path: Any
) -> None:
    from audit.offline import verify_bundle

    append_user_events("1", 2)
    sign_digest(SHELL)
    settings.SANDBOX_DIGEST_ED25519_CURRENT = "ed25519-2"
    append_user_events("2", 2)
    sign_digest(SHELL)
    result = verify_bundle(str(_bundle(tmp_path / "rotated.zip")))
    assert result.ok, result.problems
    assert result.key_trust["ed25519-2"] == "rotated from ed25519-1"
    first_fp = DigestKey.objects.get(key_id="ed25519-1").fingerprint
    pinned = verify_bundle(str(tmp_path / "rotated.zip"), trusted_fingerprints=[first_fp])
    assert pinned.ok, pinned.problems


def test_offline_a_bad_first_digest_is_not_also_a_reordered_line_1(tmp_path: Any) -> None:
    """Issue 11, item 8: the walk used to start at the first digest that verified."""
    import json as _json

    from tests.audit_exports.helpers import rewrite

    append_user_events("1", 3)
    sign_digest(SHELL)
    append_user_events("2", 3)
    sign_digest(SHELL)
    good = _bundle(tmp_path / "good.zip")

    def spoil(data: bytes) -> bytes:
        entries = _json.loads(data)
        entries[0]["signature"] = "A" * 88
        return _json.dumps(entries).encode()

    problems = _problems(rewrite(good, tmp_path / "bad.zip", "digests.json", spoil))
    assert any("digest 1 has a bad signature" in p for p in problems), problems
    assert not any("reordered" in p or "line 1 " in p for p in problems), problems


def _cut_log(tamper: Any) -> None:
    """Delete the newest events (7..9) and the digest that signed them (number 3)."""
    from tests.audit.forgery import sql

    with tamper():
        sql("DELETE FROM audit_event WHERE position >= 7")
        sql("DELETE FROM audit_digest WHERE end_position >= 7")


def _three_digests() -> None:
    for user in ("1", "2", "3"):
        append_user_events(user, 3)
        digests.sign_pending()


def test_a_cut_tail_is_found_from_an_earlier_bundle(tmp_path: Any, tamper: Any) -> None:
    _three_digests()
    earlier = _bundle(tmp_path / "earlier.zip")
    _cut_log(tamper)
    later = _bundle(tmp_path / "later.zip")
    assert _problems(later) == []  # on its own, a shorter log looks fine
    problems = _problems(later, since_bundle=str(earlier))
    assert any("earlier.zip holds digest number 3" in p for p in problems), problems


def test_a_cut_and_re_signed_tail_is_found_from_an_earlier_bundle_and_the_sink(
    settings: Any, tmp_path: Any, tamper: Any
) -> None:
    _three_digests()
    earlier = _bundle(tmp_path / "earlier.zip")
    sink_dir = settings.SANDBOX_DIGEST_SINK_DIR
    _cut_log(tamper)
    append_user_events("4", 2)
    settings.SANDBOX_DIGEST_SINK_DIR = tmp_path / "fresh-sink"  # the forger's fresh sink
    digests.sign_pending()
    later = _bundle(tmp_path / "later.zip")
    assert _problems(later) == []
    problems = _problems(later, since_bundle=str(earlier))
    assert any("digest number 3 differs from the one in" in p for p in problems), problems
    problems = _problems(later, sink_dir=str(sink_dir))
    assert any("digest number 3 differs from its copy in the sink" in p for p in problems)


def test_a_bundle_that_continues_an_earlier_one_verifies(tmp_path: Any) -> None:
    _three_digests()
    earlier = _bundle(tmp_path / "earlier.zip")
    append_user_events("4", 2)
    digests.sign_pending()
    later = _bundle(tmp_path / "later.zip")
    assert _problems(later, since_bundle=str(earlier)) == []


def test_the_offline_command_takes_since_bundle_and_sink(
    settings: Any, tmp_path: Any, tamper: Any
) -> None:
    from audit.offline import main

    _three_digests()
    earlier = _bundle(tmp_path / "earlier.zip")
    assert main(["verify", str(earlier), "--sink", str(settings.SANDBOX_DIGEST_SINK_DIR)]) == 0
    _cut_log(tamper)
    later = _bundle(tmp_path / "later.zip")
    assert main(["verify", str(later), "--since-bundle", str(earlier)]) == 1


def test_offline_a_key_known_only_from_configuration_does_not_fail_a_bundle(
    settings: Any, tmp_path: Any
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    retired = signing.public_b64(Ed25519PrivateKey.generate().public_key())
    settings.SANDBOX_DIGEST_ED25519_PUBLIC_KEYS = f"old-1:{retired}"
    append_user_events("1", 2)
    sign_digest(SHELL)
    path = _bundle(tmp_path / "bundle.zip")
    assert _problems(path) == []
    assert "old-1" in {k.key_id for k in keys.public_key_infos()}


def test_signing_on_demand_over_a_broken_chain_is_a_conflict_naming_the_break(
    mix: Any, token_client: Any, tamper: Any
) -> None:
    from audit.models import Event
    from tests.audit.forgery import sql

    client = token_client(mix.auditor)
    assert client.post("/api/v1/audit/digests/").status_code == 201
    append_user_events("9", 2)
    newest = Event.objects.order_by("-position").first().position
    with tamper():
        sql("UPDATE audit_event SET actor_name = 'mallory' WHERE position = %s", [newest])
    response = client.post("/api/v1/audit/digests/")
    assert response.status_code == 409
    assert response.json()["problem"] == {
        "position": newest,
        "kind": "altered",
        "detail": "the stored content does not match its hash",
    }
    failed = Event.objects.filter(type="audit.digest_signing_failed").get()
    assert failed.actor_name == mix.auditor.username and failed.payload["position"] == newest


def _verify_command(*args: str) -> tuple[int, str]:
    import io

    from django.core.management import call_command

    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("verify_audit_chain", *args, stdout=out, stderr=err)
    except SystemExit as exc:
        return int(exc.code), err.getvalue()
    return 0, out.getvalue()


def test_verify_audit_chain_finds_a_cut_tail_from_an_earlier_bundle(
    settings: Any, tmp_path: Any, tamper: Any
) -> None:
    """The sink lost too (a fresh directory): the earlier bundle still knows digest 3."""
    _three_digests()
    earlier = _bundle(tmp_path / "earlier.zip")
    _cut_log(tamper)
    settings.SANDBOX_DIGEST_SINK_DIR = tmp_path / "fresh-sink"
    assert _verify_command()[0] == 0
    code, text = _verify_command("--since-bundle", str(earlier))
    assert code == 1
    assert "position 7: missing: digest number 3 of the earlier bundle" in text
    append_user_events("4", 2)
    digests.sign_pending()  # signed again over the cut, into the fresh sink
    code, text = _verify_command("--since-bundle", str(earlier))
    assert code == 1 and "digest number 3 differs from the one in the earlier bundle" in text


def test_a_bundle_with_idle_digests_in_it_verifies_offline(tmp_path: Any) -> None:
    from audit.offline import verify_bundle

    append_user_events("1", 3)
    digests.sign_pending(idle=True)
    digests.sign_pending(idle=True)  # idle
    digests.sign_pending(idle=True)  # idle
    append_user_events("2", 3)
    digests.sign_pending(idle=True)
    assert [d.event_count for d in Digest.objects.order_by("sequence")] == [3, 0, 0, 3]
    result = verify_bundle(str(_bundle(tmp_path / "idle.zip")))
    assert result.ok, result.problems
    assert (result.events, result.digests) == (6, 4)
    assert verify_store().ok


def test_a_bundle_after_a_rotation_continues_an_earlier_one(settings: Any, tmp_path: Any) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    retired = signing.public_b64(Ed25519PrivateKey.generate().public_key())
    settings.SANDBOX_DIGEST_ED25519_PUBLIC_KEYS = f"old-1:{retired}"  # outside the history
    _three_digests()
    earlier = _bundle(tmp_path / "earlier.zip")
    settings.SANDBOX_DIGEST_ED25519_CURRENT = "ed25519-2"
    append_user_events("4", 2)
    digests.sign_pending()
    later = _bundle(tmp_path / "later.zip")
    assert _problems(later, since_bundle=str(earlier)) == []
