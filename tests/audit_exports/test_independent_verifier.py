"""A verifier written from docs/event-store.md alone agrees with ``audit.offline``.

``independent_verifier.py`` imports nothing of the project; on good and tampered bundles both
must reach the same verdict, and name the same line where the chain breaks.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from audit.offline import verify_bundle
from tests.astutil import parse
from tests.audit_exports import independent_verifier
from tests.audit_exports.helpers import edit_lines, make_bundle, rewrite
from tests.audit_exports.mix import Mix

pytestmark = pytest.mark.django_db


@pytest.fixture
def bundle_path(mix: Mix, tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundle.zip")


def _dump(event: dict) -> bytes:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _both(path: Path, pinned: tuple[str, ...] = ()) -> tuple[bool, int | None]:
    """The shared verdict (ok, first broken line); fails when the two verifiers disagree."""
    ours = verify_bundle(str(path), trusted_fingerprints=pinned)
    theirs = independent_verifier.verify(str(path), pinned=pinned)
    our_line = next((p.line for p in ours.problems if p.line is not None), None)
    assert (ours.ok, our_line) == (theirs.ok, theirs.broken_line), (
        [str(p) for p in ours.problems],
        theirs.problems,
    )
    return ours.ok, our_line


def test_the_independent_verifier_imports_nothing_of_the_project() -> None:
    tree = parse(Path(independent_verifier.__file__).read_text())
    imported = {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    } | {
        a.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for a in node.names
    }
    assert not imported & {"audit", "accounts", "vms", "sandbox_site", "tests", "django"}, imported


def test_both_accept_an_untouched_bundle(bundle_path: Path) -> None:
    assert _both(bundle_path) == (True, None)
    assert independent_verifier.verify(str(bundle_path)).events > 10


def _change_line(
    index: int, change: Callable[[dict], None]
) -> Callable[[list[bytes]], list[bytes]]:
    def apply(lines: list[bytes]) -> list[bytes]:
        event = json.loads(lines[index])
        change(event)
        lines[index] = _dump(event) + b"\n"
        return lines

    return apply


def _forge(event: dict) -> None:
    event["data"] = '{"forged":true}'
    event["hash"] = independent_verifier.event_hash(event)


TAMPERING: dict[str, Callable[[list[bytes]], list[bytes]]] = {
    "changed actor": _change_line(6, lambda e: e.update(actor_name="mallory")),
    "changed data": _change_line(3, lambda e: e.update(data='{"x":1}')),
    "forged with a recomputed hash": _change_line(2, _forge),
    "text where a number belongs": _change_line(1, lambda e: e.update(version=str(e["version"]))),
    "removed line": lambda ls: ls[:9] + ls[10:],
    "removed last line": lambda ls: ls[:-1],
    "removed first line": lambda ls: ls[1:],
    "swapped lines": lambda ls: ls[:4] + [ls[5], ls[4]] + ls[6:],
    "duplicated line": lambda ls: ls[:4] + [ls[4]] + ls[4:],
    "blank line": lambda ls: ls[:3] + [b"\n"] + ls[3:],
}


@pytest.mark.parametrize("how", sorted(TAMPERING))
def test_both_refuse_tampered_events_at_the_same_line(
    bundle_path: Path, tmp_path: Path, how: str
) -> None:
    ok, line = _both(edit_lines(bundle_path, tmp_path / "t.zip", TAMPERING[how]))
    assert not ok and line is not None


def _edit_json(member: str, change: Callable[[object], object]) -> Callable[[bytes], bytes]:
    return lambda data: (json.dumps(change(json.loads(data))) + "\n").encode()


def _bad_signature(digests: list) -> list:
    digests[0]["signature"] = digests[0]["signature"][::-1]
    return digests


def _dropped_digest(digests: list) -> list:
    return digests[:-1] if len(digests) > 1 else []


@pytest.mark.parametrize(
    ("member", "change"),
    [
        ("digests.json", _bad_signature),
        ("digests.json", _dropped_digest),
        ("keys.json", lambda keys: {"keys": []}),
        ("manifest.json", lambda m: {**m, "created_by": "mallory"}),
    ],
)
def test_both_refuse_a_tampered_digest_key_or_manifest(
    bundle_path: Path, tmp_path: Path, member: str, change: Callable
) -> None:
    path = rewrite(bundle_path, tmp_path / "t.zip", member, _edit_json(member, change))
    assert _both(path)[0] is False


def test_both_refuse_an_unlisted_file(bundle_path: Path, tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "extra.zip"
    path.write_bytes(bundle_path.read_bytes())
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("extra.txt", "not listed")
    assert _both(path)[0] is False


def test_both_follow_pinned_fingerprints(bundle_path: Path) -> None:
    with __import__("zipfile").ZipFile(bundle_path) as zf:
        keys = json.loads(zf.read("keys.json"))["keys"]
    right = independent_verifier.fingerprint(keys[0]["public_key"])
    assert _both(bundle_path, (right,)) == (True, None)
    assert _both(bundle_path, ("0" * 64,))[0] is False
