"""The Cloud Hypervisor OpenAPI document is part of the repository, unmodified, with its licence.

The contract tests must run in any clone: a missing document is a failure, never a skip.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys

import yaml

from tests.chsim import spec as chspec

# The upstream v53.0 file (tests/reference/README.md records where it comes from).
UPSTREAM_SHA256 = "004e2d5ab70d9d95a1de3289a70ca116c7592da62765e009232c85506cd0e6c4"


def test_the_vendored_document_is_the_upstream_file_byte_for_byte() -> None:
    data = chspec.VENDORED_SPEC.read_bytes()
    assert hashlib.sha256(data).hexdigest() == UPSTREAM_SHA256
    info = yaml.safe_load(data)["info"]
    assert info["version"] == "0.3.0"
    assert info["license"]["name"] == "Apache 2.0"


def test_the_licence_and_provenance_travel_with_it() -> None:
    licence = (chspec.REFERENCE_DIR / "LICENSE-Apache-2.0.txt").read_text()
    assert "Apache License" in licence
    assert "Version 2.0, January 2004" in licence
    note = (chspec.REFERENCE_DIR / "README.md").read_text()
    assert UPSTREAM_SHA256 in note
    assert "v53.0" in note
    assert "Apache-2.0" in note


def test_the_document_is_found_inside_the_repository_without_configuration(monkeypatch) -> None:
    monkeypatch.delenv("CHSIM_SPEC", raising=False)
    path = chspec.spec_path()
    assert path == chspec.VENDORED_SPEC
    assert path.is_relative_to(chspec.REPO_ROOT)
    assert path.is_file()


def test_the_contract_tests_run_rather_than_skip_in_a_clone_without_anything_beside_it(
    tmp_path,
) -> None:
    """A copy of tests/chsim and tests/reference alone, in a directory with nothing beside it (no
    sibling checkout of anything), loads the document: nothing outside the repository is read."""
    clone = tmp_path / "clone"
    (clone / "tests").mkdir(parents=True)
    (clone / "tests" / "__init__.py").write_text("")
    for part in ("chsim", "reference"):
        subprocess.run(  # noqa: S603 - fixed argv
            ["/bin/cp", "-r", str(chspec.REPO_ROOT / "tests" / part), str(clone / "tests")],
            check=True,
        )
    code = (
        "from tests.chsim import spec\n"
        "api = spec.load()\n"
        "assert api.path.is_relative_to(spec.REPO_ROOT), api.path\n"
        "print(len(api.operations))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(clone)}
    done = subprocess.run(  # noqa: S603 - fixed argv
        [sys.executable, "-c", code],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 30
