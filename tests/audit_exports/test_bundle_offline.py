"""Evidence bundles verify offline; any changed, removed or reordered line is named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from audit import offline
from audit.offline import verify_bundle
from audit.store import COLUMNS
from tests.audit_exports.helpers import edit_lines, make_bundle, rewrite
from tests.audit_exports.mix import Mix

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bundle_path(mix: Mix, tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundle.zip")


def _problems(path: Path) -> list[str]:
    return [str(p) for p in verify_bundle(str(path)).problems]


def test_an_untouched_bundle_verifies(bundle_path: Path) -> None:
    result = verify_bundle(str(bundle_path))
    assert result.ok, result.problems
    with zipfile.ZipFile(bundle_path) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        lines = zf.read("events.jsonl").splitlines()
    assert result.events == len(lines) == manifest["range"]["event_count"]
    assert result.first_position == 1 and result.digests >= 1
    assert set(json.loads(lines[0])) == set(COLUMNS)


def test_event_lines_hold_exactly_the_stored_fields(bundle_path: Path) -> None:
    from audit.models import Event

    with zipfile.ZipFile(bundle_path) as zf:
        first = json.loads(zf.read("events.jsonl").splitlines()[4])
    stored = Event.objects.get(position=first["position"])
    assert first["data"] == stored.data  # the canonical text, not a re-encoding
    assert first["hash"] == stored.hash and first["prev_hash"] == stored.prev_hash
    assert offline.EVENT_FIELDS == COLUMNS


def test_a_changed_line_is_named(bundle_path: Path, tmp_path: Path) -> None:
    def change(lines: list[bytes]) -> list[bytes]:
        event = json.loads(lines[6])
        event["actor_name"] = "mallory"
        lines[6] = json.dumps(event, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        return lines

    problems = _problems(edit_lines(bundle_path, tmp_path / "changed.zip", change))
    assert any("line 7 (position 7): altered" in p for p in problems), problems


def test_a_changed_line_with_a_recomputed_hash_is_named_at_the_next_line(
    bundle_path: Path, tmp_path: Path
) -> None:
    from audit.hashing import event_hash

    def change(lines: list[bytes]) -> list[bytes]:
        event = json.loads(lines[2])
        event["data"] = '{"forged":true}'
        event["hash"] = event_hash(event, event["data"], event["prev_hash"])
        lines[2] = json.dumps(event, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        return lines

    problems = _problems(edit_lines(bundle_path, tmp_path / "forged.zip", change))
    assert any("line 4 (position 4): broken link" in p for p in problems), problems


def test_a_removed_line_is_named(bundle_path: Path, tmp_path: Path) -> None:
    problems = _problems(
        edit_lines(bundle_path, tmp_path / "removed.zip", lambda lines: lines[:9] + lines[10:])
    )
    assert any("line 10 (position 11): missing" in p for p in problems), problems


def test_a_removed_last_line_is_named(bundle_path: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(bundle_path) as zf:
        n = len(zf.read("events.jsonl").splitlines())
    problems = _problems(edit_lines(bundle_path, tmp_path / "cut.zip", lambda lines: lines[:-1]))
    assert any(f"line {n} (position {n})" in p and "missing at the end" in p for p in problems)


def test_reordered_lines_are_named(bundle_path: Path, tmp_path: Path) -> None:
    def swap(lines: list[bytes]) -> list[bytes]:
        lines[4], lines[5] = lines[5], lines[4]
        return lines

    problems = _problems(edit_lines(bundle_path, tmp_path / "swapped.zip", swap))
    assert any(p.startswith("events.jsonl line 5 (position 6)") for p in problems), problems


def test_reordered_and_renumbered_lines_are_named(bundle_path: Path, tmp_path: Path) -> None:
    """Swapping two events and their positions keeps positions in order: the links catch it."""

    def swap(lines: list[bytes]) -> list[bytes]:
        a, b = json.loads(lines[4]), json.loads(lines[5])
        a["position"], b["position"] = b["position"], a["position"]
        enc = [
            json.dumps(x, sort_keys=True, separators=(",", ":")).encode() + b"\n" for x in (b, a)
        ]
        lines[4], lines[5] = enc
        return lines

    problems = _problems(edit_lines(bundle_path, tmp_path / "renumbered.zip", swap))
    assert any("line 5 (position 5): broken link" in p for p in problems), problems


def test_a_forged_digest_signature_fails(bundle_path: Path, tmp_path: Path) -> None:
    def forge(data: bytes) -> bytes:
        digests = json.loads(data)
        digests[0]["signature"] = "A" * 88
        return json.dumps(digests).encode()

    problems = _problems(rewrite(bundle_path, tmp_path / "sig.zip", "digests.json", forge))
    assert any("digest 1 has a bad signature" in p for p in problems), problems
    assert any("digests.json: SHA-256 differs from the manifest" in p for p in problems)


def test_pinned_keys_refuse_a_bundle_signed_by_another_key(bundle_path: Path) -> None:
    good = verify_bundle(str(bundle_path))
    fingerprint = next(iter(good.key_fingerprints.values()))
    assert verify_bundle(str(bundle_path), trusted_fingerprints=[fingerprint]).ok
    other = verify_bundle(str(bundle_path), trusted_fingerprints=["0" * 64])
    assert not other.ok and any("not one you trust" in str(p) for p in other.problems)


def test_the_range_is_widened_to_whole_digests(mix: Mix, tmp_path: Path) -> None:
    path = make_bundle(tmp_path / "part.zip", first=5, last=8)
    result = verify_bundle(str(path))
    assert result.ok, result.problems
    assert result.first_position <= 5 and result.last_position >= 8


def test_hmac_digests_need_the_secret_offline(mix: Mix, tmp_path: Path, settings) -> None:
    from audit import commands
    from audit.actor import Actor
    from tests.audit.helpers import append_user_events

    settings.SANDBOX_DIGEST_ALGORITHM = "hmac-sha256"
    append_user_events("hm", 3)
    commands.sign_digest(Actor.system())
    settings.SANDBOX_DIGEST_ALGORITHM = "ed25519"
    path = make_bundle(tmp_path / "mixed.zip")
    problems = _problems(path)
    assert any("HMAC-SHA256" in p and "--hmac-key" in p for p in problems), problems
    secret = settings.SANDBOX_DIGEST_HMAC_KEYS["hmac-1"]
    assert verify_bundle(str(path), hmac_keys={"hmac-1": secret}).ok


def _run_offline(*args: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "DJANGO_SETTINGS_MODULE", "REDIS_URL"}
    }
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "audit.offline", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=120,
    )


def test_offline_verification_runs_without_django(bundle_path: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(bundle_path) as zf:
        fingerprint = json.loads(zf.read("keys.json"))["keys"][0]["fingerprint"]
    done = _run_offline("verify", str(bundle_path), "--trust", fingerprint)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK: ")
    changed = edit_lines(bundle_path, tmp_path / "bad.zip", lambda lines: lines[:3] + lines[4:])
    failed = _run_offline("verify", str(changed))
    assert failed.returncode == 1
    assert "events.jsonl line 4 (position 5)" in failed.stderr
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, audit.offline; "
            "assert not any(m == 'django' or m.startswith('django.') for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith('django'))",
        ],
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)},
        cwd=str(tmp_path),
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr


def test_an_unreadable_file_exits_2(tmp_path: Path) -> None:
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip")
    done = _run_offline("verify", str(junk))
    assert done.returncode == 2 and "UNREADABLE" in done.stderr
