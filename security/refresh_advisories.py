"""Refresh the pinned advisory copy (``security/pypi-advisories.json``) from a checkout of the
PyPA advisory database (OSV records as YAML under ``vulns/<package>/``).

    python -m security.refresh_advisories PATH/TO/advisory-database --commit SHA --date ISO-DATE

Keeps the records of every distribution installed in this environment (run it with the product's
``.venv`` after ``make deps``) and of every one the copy covered before, trimmed to what the scan
reads. The database is CC BY 4.0 (PyPA); the copy says where and when it was taken.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from security import advisories

KEEP = ("id", "aliases", "summary", "severity", "withdrawn", "published", "modified")


def trim(record: dict[str, Any], covered: set[str]) -> dict[str, Any] | None:
    affected = []
    for entry in record.get("affected") or ():
        package = entry.get("package") or {}
        if package.get("ecosystem") != "PyPI":
            continue
        if advisories.normalize(package.get("name", "")) not in covered:
            continue
        ranges = [r for r in entry.get("ranges") or () if r.get("type") == "ECOSYSTEM"]
        kept: dict[str, Any] = {"package": {"ecosystem": "PyPI", "name": package["name"]}}
        if ranges:
            kept["ranges"] = [{"type": "ECOSYSTEM", "events": r["events"]} for r in ranges]
        else:  # only a list of versions says what is affected
            kept["versions"] = [str(v) for v in entry.get("versions") or ()]
        affected.append(kept)
    if not affected:
        return None
    out = {k: record[k] for k in KEEP if record.get(k)}
    if "summary" not in out and record.get("details"):
        out["summary"] = " ".join(str(record["details"]).split())[:200]
    out["affected"] = affected
    return json.loads(json.dumps(out, default=str))  # dates as ISO text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="a checkout of the PyPA advisory database")
    parser.add_argument("--commit", required=True, help="the source's commit")
    parser.add_argument("--date", required=True, help="the source commit's date")
    parser.add_argument("--out", type=Path, default=advisories.PINNED)
    args = parser.parse_args()
    covered = set(advisories.installed())
    if args.out.exists():
        covered |= set(advisories.load(args.out)["covers"])
    records = []
    for path in sorted((args.source / "vulns").glob("*/*.yaml")):
        if advisories.normalize(path.parent.name) not in covered:
            continue
        trimmed = trim(yaml.safe_load(path.read_text()), covered)
        if trimmed is not None:
            records.append(trimmed)
    data = {
        "source": "PyPA advisory database (https://github.com/pypa/advisory-database)",
        "license": "CC-BY-4.0",
        "commit": args.commit,
        "date": args.date,
        "covers": sorted(covered),
        "advisories": records,
    }
    args.out.write_text(json.dumps(data, indent=0, sort_keys=True) + "\n")
    print(f"{len(records)} advisories for {len(covered)} distributions -> {args.out}")


if __name__ == "__main__":
    main()
