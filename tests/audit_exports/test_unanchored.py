"""A bundle verified with nothing outside it to vouch for it is UNANCHORED, never OK.

Filed: a bundle whose first event was changed, its chain recomputed and everything re-signed
with a fresh key under the server's key id (``ed25519-1``) verified ``OK ... (first key of the
history (trusted on first use))`` with exit status 0."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audit import offline, signing
from audit.hashing import GENESIS_HASH, canonical_json, event_hash
from tests.audit_exports.helpers import make_bundle
from tests.audit_exports.mix import Mix
from tests.audit_exports.test_bundle_offline import _run_offline

pytestmark = pytest.mark.django_db


def forge(src: Path, dst: Path) -> str:
    """Rewrite the first event, recompute the chain and re-sign everything with a new key
    that takes the id of the server's first key. Returns the forger's fingerprint."""
    with zipfile.ZipFile(src) as zin:
        files = {n: zin.read(n) for n in zin.namelist()}
    events = [json.loads(line) for line in files["events.jsonl"].decode().splitlines()]
    data = json.loads(events[0]["data"])
    data["forged"] = True
    events[0]["data"] = canonical_json(data)
    prev = GENESIS_HASH
    for e in events:
        e["prev_hash"] = prev
        e["hash"] = prev = event_hash(e, e["data"], prev)
    hash_at = {e["position"]: e["hash"] for e in events}
    private = Ed25519PrivateKey.generate()
    public = signing.public_b64(private.public_key())
    keys = json.loads(files["keys.json"])
    first = keys["keys"][0]
    key_id = first["key_id"]
    digests = json.loads(files["digests.json"])
    previous_document = None
    for entry in digests:
        doc = json.loads(entry["document"])
        doc["key_id"] = key_id
        doc["end_hash"] = hash_at[doc["end_position"]]
        doc["start_prev_hash"] = hash_at.get(doc["start_position"] - 1, GENESIS_HASH)
        if "prev_digest_sha256" in doc:
            doc["prev_digest_sha256"] = (
                signing.document_sha256(previous_document)
                if previous_document
                else signing.GENESIS_DIGEST
            )
        entry["document"] = previous_document = canonical_json(doc)
        entry["signature"] = signing.sign(private, entry["document"])
        for name in ("end_hash", "start_prev_hash", "prev_digest_sha256", "key_id"):
            if name in entry:
                entry[name] = doc[name]
    statement = signing.key_statement(
        key_id=key_id,
        public_key=public,
        created_at=json.loads(first["statement"])["created_at"],
        signed_by=key_id,
        previous_key_id="",
        previous_statement=None,
    )
    first.update(
        public_key=public,
        fingerprint=signing.fingerprint(public),
        statement=statement,
        signed_by=key_id,
        signature=signing.sign(private, statement),
    )
    keys["keys"] = [first]
    files["events.jsonl"] = "".join(
        json.dumps(e, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
        for e in events
    ).encode()
    files["digests.json"] = json.dumps(digests).encode()
    files["keys.json"] = json.dumps(keys).encode()
    manifest = json.loads(files["manifest.json"])
    for name in manifest["files"]:
        manifest["files"][name] = {
            "sha256": hashlib.sha256(files[name]).hexdigest(),
            "size": len(files[name]),
        }
    files["manifest.json"] = (canonical_json(manifest) + "\n").encode()
    files["manifest.sig"] = json.dumps(
        {
            "algorithm": "ed25519",
            "key_id": key_id,
            "signature": signing.sign(private, files["manifest.json"]),
        }
    ).encode()
    with zipfile.ZipFile(dst, "w") as zout:
        for name, content in files.items():
            zout.writestr(name, content)
    return signing.fingerprint(public)


@pytest.fixture
def genuine(mix: Mix, tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "genuine.zip")


def _server_fingerprint(bundle: Path) -> str:
    with zipfile.ZipFile(bundle) as zf:
        return json.loads(zf.read("keys.json"))["keys"][0]["fingerprint"]


def test_a_forged_bundle_with_no_anchor_is_unanchored_not_ok(genuine: Path, tmp_path: Path):
    forged = tmp_path / "forged.zip"
    forge(genuine, forged)
    result = offline.verify_bundle(str(forged))
    assert result.problems == []  # consistent in itself: that is all it can show
    assert (result.anchored, result.verdict) == (False, "unanchored")
    done = _run_offline("verify", str(forged))
    assert done.returncode == offline.EXIT_STATUS["unanchored"] == 3, done.stdout + done.stderr
    assert done.stdout.startswith("UNANCHORED: the chain is internally consistent but no trust")
    assert "OK" not in done.stdout.split(";")[0]
    as_json = _run_offline("verify", str(forged), "--json")
    assert as_json.returncode == 3
    assert json.loads(as_json.stdout)["verdict"] == "unanchored"


def test_the_forged_bundle_fails_against_each_anchor(
    genuine: Path, tmp_path: Path, settings
) -> None:
    forged = tmp_path / "forged.zip"
    forge(genuine, forged)
    anchors = (
        ["--trust", _server_fingerprint(genuine)],
        ["--since-bundle", str(genuine)],
        ["--sink", str(settings.SANDBOX_DIGEST_SINK_DIR)],
    )
    for anchor in anchors:
        done = _run_offline("verify", str(forged), *anchor)
        assert done.returncode == 1, (anchor, done.stdout, done.stderr)
        assert "FAILED" in done.stderr


def test_the_genuine_bundle_is_ok_against_each_anchor(
    genuine: Path, tmp_path: Path, settings
) -> None:
    for anchor in (
        ["--trust", _server_fingerprint(genuine)],
        ["--sink", str(settings.SANDBOX_DIGEST_SINK_DIR)],
    ):
        done = _run_offline("verify", str(genuine), *anchor)
        assert done.returncode == 0, (anchor, done.stdout, done.stderr)
        assert done.stdout.startswith("OK: ")
    trust = [_server_fingerprint(genuine)]
    result = offline.verify_bundle(
        str(genuine), since_bundle=str(genuine), trusted_fingerprints=trust
    )
    assert result.verdict == "verified"


def test_an_earlier_bundle_anchors_only_when_it_was_itself_anchored(
    genuine: Path, tmp_path: Path, settings
) -> None:
    """Filed: ``verify forged.zip --since-bundle forged.zip`` said OK (exit 0): the earlier
    bundle only had to be consistent in itself, and a forger makes both."""
    forged = tmp_path / "forged.zip"
    forge(genuine, forged)
    done = _run_offline("verify", str(forged), "--since-bundle", str(forged))
    assert done.returncode == offline.EXIT_STATUS["unanchored"] == 3, done.stdout + done.stderr
    assert done.stdout.startswith("UNANCHORED: ")
    assert f"the earlier bundle {forged} is itself unanchored" in done.stdout
    as_json = json.loads(
        _run_offline("verify", str(forged), "--since-bundle", str(forged), "--json").stdout
    )
    assert (as_json["verdict"], as_json["anchored"]) == ("unanchored", False)
    assert "itself unanchored" in as_json["anchor_note"]
    # The genuine bundle, after an unanchored copy of itself: not vouched for either.
    result = offline.verify_bundle(str(genuine), since_bundle=str(genuine))
    assert (result.problems, result.verdict) == ([], "unanchored")
    # An earlier bundle verified against the sink is an anchor.
    sink = str(settings.SANDBOX_DIGEST_SINK_DIR)
    done = _run_offline("verify", str(genuine), "--since-bundle", str(genuine), "--sink", sink)
    assert done.returncode == 0 and done.stdout.startswith("OK: "), done.stdout + done.stderr
    assert offline._Earlier.load(str(genuine), (), sink).anchored is True


def test_a_sink_with_none_of_the_bundles_digests_is_no_anchor(genuine: Path, tmp_path: Path):
    empty = tmp_path / "other-sink"
    empty.mkdir()
    result = offline.verify_bundle(str(genuine), sink_dir=str(empty))
    assert result.verdict != "verified"
