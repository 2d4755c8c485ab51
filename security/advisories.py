"""Known vulnerabilities of installed Python distributions, from a pinned copy of the PyPA
advisory database (OSV records, ``security/pypi-advisories.json``).

Only the standard library and ``packaging``: it runs in the product's environment and looks at
what is installed there. Severity comes from a record's CVSS v3 vector (base score, as the
specification computes it); a record with no CVSS v3 vector (none at all, or CVSS v4 only) counts
as high, so that what cannot be scored fails rather than passes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

__all__ = [
    "Finding",
    "PINNED",
    "affected",
    "cvss3_base_score",
    "findings",
    "installed",
    "load",
    "normalize",
    "severity",
]

PINNED = Path(__file__).resolve().parent / "pypi-advisories.json"
SEVERITIES = ("low", "medium", "high", "critical")


def normalize(name: str) -> str:
    """A distribution name as PyPI compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


# --- CVSS v3.x base score (FIRST, CVSS v3.1 specification, section 7) ------------------------
_WEIGHTS: dict[str, dict[str, float]] = {
    "AV": {"N": 0.85, "A": 0.62, "L": 0.55, "P": 0.2},
    "AC": {"L": 0.77, "H": 0.44},
    "UI": {"N": 0.85, "R": 0.62},
    "C": {"H": 0.56, "L": 0.22, "N": 0.0},
    "I": {"H": 0.56, "L": 0.22, "N": 0.0},
    "A": {"H": 0.56, "L": 0.22, "N": 0.0},
}
_PR = {"U": {"N": 0.85, "L": 0.62, "H": 0.27}, "C": {"N": 0.85, "L": 0.68, "H": 0.5}}


def _roundup(value: float) -> float:
    as_int = round(value * 100_000)
    if as_int % 10_000 == 0:
        return as_int / 100_000.0
    return (math.floor(as_int / 10_000) + 1) / 10.0


def cvss3_base_score(vector: str) -> float:
    """The base score of a ``CVSS:3.x/AV:../..`` vector; ValueError when it is not one."""
    parts = vector.split("/")
    if not parts or not parts[0].startswith("CVSS:3"):
        raise ValueError(f"not a CVSS v3 vector: {vector!r}")
    metrics = dict(p.split(":", 1) for p in parts[1:] if ":" in p)
    try:
        scope = metrics["S"]
        iss = 1 - (
            (1 - _WEIGHTS["C"][metrics["C"]])
            * (1 - _WEIGHTS["I"][metrics["I"]])
            * (1 - _WEIGHTS["A"][metrics["A"]])
        )
        impact = 6.42 * iss if scope == "U" else 7.52 * (iss - 0.029) - 3.25 * (iss - 0.02) ** 15
        exploitability = (
            8.22
            * _WEIGHTS["AV"][metrics["AV"]]
            * _WEIGHTS["AC"][metrics["AC"]]
            * _PR[scope][metrics["PR"]]
            * _WEIGHTS["UI"][metrics["UI"]]
        )
    except KeyError as exc:
        raise ValueError(f"incomplete CVSS v3 vector: {vector!r}") from exc
    if impact <= 0:
        return 0.0
    if scope == "U":
        return _roundup(min(impact + exploitability, 10))
    return _roundup(min(1.08 * (impact + exploitability), 10))


def severity(record: Mapping[str, Any]) -> tuple[str, str]:
    """(severity, how it was found) of an OSV record: from its CVSS v3 base score, else high."""
    for entry in record.get("severity") or ():
        if entry.get("type") == "CVSS_V3":
            try:
                score = cvss3_base_score(str(entry.get("score", "")))
            except ValueError:
                continue
            if score >= 9.0:
                level = "critical"
            elif score >= 7.0:
                level = "high"
            elif score >= 4.0:
                level = "medium"
            else:
                level = "low"
            return level, f"CVSS v3 {score}"
    return "high", "no CVSS v3 score: counted as high"


# --- Which versions a record affects (OSV schema, "affected") -------------------------------


def _version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def _in_range(version: Version, events: Iterable[Mapping[str, str]]) -> bool:
    """Whether ``version`` lies in an ECOSYSTEM range, its events applied in version order."""
    points: list[tuple[Version, int, str]] = []
    order = {"introduced": 0, "fixed": 1, "last_affected": 2, "limit": 3}
    for event in events:
        for kind, value in event.items():
            if kind not in order:
                continue
            at = Version("0") if kind == "introduced" and value == "0" else _version(value)
            if at is not None:
                points.append((at, order[kind], kind))
    affected = False
    for at, _, kind in sorted(points):
        if kind == "introduced" and version >= at:
            affected = True
        elif kind == "fixed" and version >= at:
            affected = False
        elif kind == "last_affected" and version > at:
            affected = False
        elif kind == "limit" and version >= at:
            affected = False
    return affected


def affected(record: Mapping[str, Any], name: str, version: str) -> bool:
    """Whether ``record`` says that distribution ``name`` at ``version`` is vulnerable."""
    parsed = _version(version)
    for entry in record.get("affected") or ():
        package = entry.get("package") or {}
        if package.get("ecosystem") != "PyPI" or normalize(package.get("name", "")) != name:
            continue
        if version in (entry.get("versions") or ()):
            return True
        if parsed is None:
            continue
        for rng in entry.get("ranges") or ():
            if rng.get("type") == "ECOSYSTEM" and _in_range(parsed, rng.get("events") or ()):
                return True
    return False


# --- The pinned copy and what is installed ---------------------------------------------------


def load(path: Path = PINNED) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    if not isinstance(data.get("advisories"), list) or not isinstance(data.get("covers"), list):
        raise ValueError(f"{path}: not an advisory copy (advisories and covers expected)")
    return data


def installed(skip: Iterable[str] = ()) -> dict[str, str]:
    """Normalized name to version of every distribution in this environment."""
    skipped = {normalize(s) for s in skip}
    out: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        # The first one on the path is the one that imports (a shadowed copy is not used).
        if name and normalize(name) not in skipped:
            out.setdefault(normalize(name), dist.version)
    return out


@dataclass(frozen=True)
class Finding:
    name: str
    version: str
    id: str
    aliases: tuple[str, ...]
    severity: str
    why: str
    summary: str
    fixed: tuple[str, ...]

    @property
    def fails(self) -> bool:
        return SEVERITIES.index(self.severity) >= SEVERITIES.index("high")


def _fixed_versions(record: Mapping[str, Any], name: str) -> tuple[str, ...]:
    fixed: list[str] = []
    for entry in record.get("affected") or ():
        if normalize((entry.get("package") or {}).get("name", "")) != name:
            continue
        for rng in entry.get("ranges") or ():
            fixed += [e["fixed"] for e in rng.get("events") or () if "fixed" in e]
    return tuple(fixed)


def findings(advisories: Iterable[Mapping[str, Any]], packages: Mapping[str, str]) -> list[Finding]:
    """Every advisory that affects an installed version, worst first."""
    by_name: dict[str, list[Mapping[str, Any]]] = {}
    for record in advisories:
        for entry in record.get("affected") or ():
            name = normalize((entry.get("package") or {}).get("name", ""))
            by_name.setdefault(name, []).append(record)
    out: list[Finding] = []
    for name, version in sorted(packages.items()):
        seen: set[str] = set()
        for record in by_name.get(name, ()):
            if record["id"] in seen or record.get("withdrawn"):
                continue
            seen.add(record["id"])
            if affected(record, name, version):
                level, why = severity(record)
                out.append(
                    Finding(
                        name=name,
                        version=version,
                        id=record["id"],
                        aliases=tuple(record.get("aliases") or ()),
                        severity=level,
                        why=why,
                        summary=str(record.get("summary") or record.get("details") or "")[:160],
                        fixed=_fixed_versions(record, name),
                    )
                )
    out.sort(key=lambda f: (-SEVERITIES.index(f.severity), f.name, f.id))
    return out
