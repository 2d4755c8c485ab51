"""The vulnerability scan (``make scan``, security/scan.py) fails on a high-severity finding:
bandit's on the product's code, or an advisory that affects an installed distribution."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from security import advisories, scan


@pytest.mark.parametrize(
    ("vector", "score"),
    [
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", 9.8),
        ("CVSS:3.1/AV:N/AC:L/PR:L/UI:N/S:C/C:L/I:L/A:N", 6.4),
        ("CVSS:3.1/AV:N/AC:L/PR:L/UI:N/S:U/C:H/I:H/A:H", 8.8),
        ("CVSS:3.0/AV:L/AC:H/PR:H/UI:R/S:U/C:L/I:N/A:N", 1.8),
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:C/C:H/I:H/A:H", 10.0),
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:N", 0.0),
    ],
)
def test_cvss3_base_scores_follow_the_specification(vector: str, score: float) -> None:
    assert advisories.cvss3_base_score(vector) == score


def record(rid: str, events: list[dict[str, str]], vector: str | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "id": rid,
        "affected": [
            {
                "package": {"ecosystem": "PyPI", "name": "Some_Package"},
                "ranges": [{"type": "ECOSYSTEM", "events": events}],
            }
        ],
    }
    if vector:
        rec["severity"] = [{"type": "CVSS_V3", "score": vector}]
    return rec


@pytest.mark.parametrize(
    ("events", "version", "hit"),
    [
        ([{"introduced": "0"}, {"fixed": "2.0"}], "1.9.9", True),
        ([{"introduced": "0"}, {"fixed": "2.0"}], "2.0", False),
        ([{"introduced": "1.5"}, {"fixed": "2.0"}], "1.4", False),
        ([{"introduced": "1.0"}, {"last_affected": "1.2"}], "1.2", True),
        ([{"introduced": "1.0"}, {"last_affected": "1.2"}], "1.2.1", False),
        (
            [{"introduced": "5.0"}, {"fixed": "5.0.8"}, {"introduced": "4.2"}, {"fixed": "4.2.15"}],
            "4.2.14",
            True,
        ),
        (
            [{"introduced": "5.0"}, {"fixed": "5.0.8"}, {"introduced": "4.2"}, {"fixed": "4.2.15"}],
            "4.2.15",
            False,
        ),
        (
            [{"introduced": "5.0"}, {"fixed": "5.0.8"}, {"introduced": "4.2"}, {"fixed": "4.2.15"}],
            "5.0.3",
            True,
        ),
        ([{"introduced": "3.0"}], "9.9", True),
    ],
)
def test_which_versions_an_advisory_affects(
    events: list[dict[str, str]], version: str, hit: bool
) -> None:
    assert advisories.affected(record("X-1", events), "some-package", version) is hit


def test_high_and_unscored_advisories_fail_and_lower_ones_do_not() -> None:
    recs = [
        record(
            "HIGH-1",
            [{"introduced": "0"}, {"fixed": "2.0"}],
            "CVSS:3.1/AV:N/AC:L/PR:L/UI:N/S:U/C:H/I:H/A:H",
        ),
        record(
            "MED-1",
            [{"introduced": "0"}, {"fixed": "2.0"}],
            "CVSS:3.1/AV:N/AC:L/PR:L/UI:N/S:C/C:L/I:L/A:N",
        ),
        record("NOSCORE-1", [{"introduced": "0"}, {"fixed": "2.0"}]),
        record(
            "FIXED-1",
            [{"introduced": "0"}, {"fixed": "1.0"}],
            "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H",
        ),
    ]
    found = {f.id: f for f in advisories.findings(recs, {"some-package": "1.5", "other": "1.0"})}
    assert set(found) == {"HIGH-1", "MED-1", "NOSCORE-1"}
    assert (found["HIGH-1"].severity, found["HIGH-1"].fails) == ("high", True)
    assert (found["MED-1"].severity, found["MED-1"].fails) == ("medium", False)
    assert (found["NOSCORE-1"].severity, found["NOSCORE-1"].fails) == ("high", True)
    assert found["HIGH-1"].fixed == ("2.0",)


def test_the_pinned_copy_covers_the_products_dependencies() -> None:
    data = advisories.load()
    assert data["license"] == "CC-BY-4.0" and data["commit"] and data["date"]
    for name in ("django", "djangorestframework", "cryptography", "channels", "psycopg"):
        assert name in data["covers"]
    assert any(r["id"].startswith("PYSEC-") for r in data["advisories"])


def test_the_dependency_step_fails_on_a_high_advisory_for_what_is_installed(
    monkeypatch: Any, capsys: Any
) -> None:
    data = advisories.load()
    django = advisories.installed()["django"]
    planted = {
        "id": "PYSEC-TEST-1",
        "affected": [
            {
                "package": {"ecosystem": "PyPI", "name": "Django"},
                "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}]}],
            }
        ],
        "severity": [{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"}],
    }
    monkeypatch.setattr(advisories, "load", lambda: {**data, "advisories": [planted]})
    assert scan.pinned_advisories() is False
    assert f"CRITICAL django {django}: PYSEC-TEST-1" in capsys.readouterr().out
    monkeypatch.setattr(advisories, "load", lambda: {**data, "advisories": []})
    assert scan.pinned_advisories() is True


BAD = """import subprocess


def run(cmd: str) -> None:
    subprocess.call(cmd, shell=True){nosec}
"""


@pytest.mark.parametrize(
    ("nosec", "passes"),
    [("", False), ("  # nosec B602 (the command is a constant of ours)", True)],
)
def test_bandit_fails_on_a_high_severity_finding_unless_justified(
    tmp_path: Path, monkeypatch: Any, nosec: str, passes: bool
) -> None:
    (tmp_path / "pyproject.toml").write_text((Path(scan.ROOT) / "pyproject.toml").read_text())
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "bad.py").write_text(BAD.format(nosec=nosec))
    monkeypatch.setattr(scan, "ROOT", tmp_path)
    assert scan.bandit() is passes
