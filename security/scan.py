"""``make scan``: fail on a high-severity finding of any of the scanners.

1. bandit over the product's code (configured in pyproject.toml, ``[tool.bandit]``): a finding of
   high severity fails; a justified exception carries ``# nosec <test id>`` and its reason.
2. The installed Python distributions against the pinned copy of the PyPA advisory database
   (``security/pypi-advisories.json``; refreshed by ``security.refresh_advisories``): a high or
   critical advisory, or one that cannot be scored, fails. Then pip-audit against PyPI's live
   vulnerability data when it can be reached from here (it cannot from the development and CI
   machines, which reach the package index but not its JSON API nor OSV: the step says so).
3. ``npm audit`` of the front end when the registry's audit endpoint answers (same caveat).

Run with the product's interpreter (``.venv/bin/python -m security.scan``): step 2 looks at what
is installed in it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from security import advisories

ROOT = Path(__file__).resolve().parent.parent
BANDIT_TARGETS = ("core", "audit", "accounts", "vms", "sandbox_site", "images", "security", "sdk")
PRODUCT = "microvm-sandbox"  # the editable install of this checkout
SDK = "microvm-sandbox-sdk"  # and of its SDK (sdk/)


def say(text: str) -> None:
    print(text, flush=True)


def run(
    cmd: list[str], cwd: Path | None = None, timeout: int = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 (fixed argument lists, no shell)
        cmd, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def bandit() -> bool:
    targets = [t for t in BANDIT_TARGETS if (ROOT / t).is_dir()]
    cmd = [sys.executable, "-m", "bandit", "-c", "pyproject.toml", "-r", *targets]
    result = run([*cmd, "-q", "--severity-level", "high", "-f", "txt"])
    if result.returncode not in (0, 1):
        say(result.stdout + result.stderr)
        say("bandit: did not run")
        return False
    if result.returncode == 1:
        say(result.stdout)
        say("bandit: high-severity findings (fix them, or justify each with # nosec and why)")
        return False
    say(f"bandit: no high-severity finding in {', '.join(targets)}")
    return True


def _print_findings(found: list[advisories.Finding]) -> None:
    for f in found:
        fixed = f", fixed in {', '.join(f.fixed)}" if f.fixed else ""
        aka = f" ({', '.join(f.aliases)})" if f.aliases else ""
        say(f"  {f.severity.upper():8} {f.name} {f.version}: {f.id}{aka}{fixed} [{f.why}]")
        say(f"           {f.summary}")


def pinned_advisories() -> bool:
    data = advisories.load()
    packages = advisories.installed(skip=[PRODUCT, SDK])
    found = advisories.findings(data["advisories"], packages)
    uncovered = sorted(set(packages) - set(data["covers"]))
    say(
        f"dependencies: {len(packages)} installed distributions against the pinned PyPA "
        f"advisory database of {data['date'][:10]} ({len(data['advisories'])} advisories)"
    )
    _print_findings(found)
    if uncovered:
        say(
            f"  not in the pinned copy (refresh it: python -m security.refresh_advisories): "
            f"{', '.join(uncovered)}"
        )
    failing = [f for f in found if f.fails]
    if failing:
        say(f"dependencies: {len(failing)} high-severity advisories: upgrade those distributions")
        return False
    say("dependencies: no high-severity advisory")
    return True


def _pip_audit(args: list[str]) -> dict[str, Any] | None:
    cmd = [sys.executable, "-m", "pip_audit", "-f", "json", "--progress-spinner", "off", *args]
    try:
        result = run(cmd, timeout=300)
    except subprocess.TimeoutExpired:
        return None
    try:
        parsed: dict[str, Any] = json.loads(result.stdout)
    except json.JSONDecodeError:
        return None
    return parsed


def pip_audit_live() -> bool:
    """pip-audit with PyPI's vulnerability data, when that can be reached; its findings are
    judged by the pinned copy's severity for the same advisory (unknown: high)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as probe:
        probe.write(f"pip=={metadata.version('pip')}\n")
        probe.flush()
        answer = _pip_audit(["-r", probe.name, "--no-deps", "--disable-pip"])
    deps = (answer or {}).get("dependencies") or [{}]
    if answer is None or "skip_reason" in deps[0]:
        say(
            "pip-audit: PyPI's vulnerability data (its JSON API) is not reachable from here; "
            "the pinned copy above is what was scanned"
        )
        return True
    report = _pip_audit(["--skip-editable"])
    if report is None:
        say("pip-audit: did not finish")
        return False
    by_id: dict[str, dict[str, Any]] = {}
    for record in advisories.load()["advisories"]:
        for key in (record["id"], *(record.get("aliases") or ())):
            by_id[key] = record
    failing = 0
    for dep in report.get("dependencies") or ():
        for vuln in dep.get("vulns") or ():
            record = next(
                (by_id[k] for k in (vuln["id"], *vuln.get("aliases", ())) if k in by_id), {}
            )
            level, why = advisories.severity(record)
            failing += advisories.SEVERITIES.index(level) >= advisories.SEVERITIES.index("high")
            say(f"  {level.upper():8} {dep['name']} {dep['version']}: {vuln['id']} [{why}]")
    if failing:
        say(f"pip-audit: {failing} high-severity advisories")
        return False
    say("pip-audit: no high-severity advisory")
    return True


def npm_audit() -> bool:
    frontend = ROOT / "frontend"
    if not (frontend / "package-lock.json").exists():
        say("npm audit: no frontend/package-lock.json")
        return True
    try:
        result = run(["npm", "audit", "--json", "--audit-level=high"], cwd=frontend, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        say(f"npm audit: could not run ({exc})")
        return True
    try:
        report = json.loads(result.stdout or "{}")
    except json.JSONDecodeError:
        report = {}
    counts = (report.get("metadata") or {}).get("vulnerabilities")
    if counts is None:
        why = report.get("message") or (result.stderr.strip().splitlines() or ["no answer"])[-1]
        say(f"npm audit: the registry's audit endpoint is not reachable from here ({why})")
        return True
    high = int(counts.get("high", 0)) + int(counts.get("critical", 0))
    say(f"npm audit: {json.dumps(counts, sort_keys=True)}")
    if high:
        say(f"npm audit: {high} high-severity advisories in the front end's dependencies")
        return False
    return True


def main() -> int:
    ok = True
    for step in (bandit, pinned_advisories, pip_audit_live, npm_audit):
        started = time.monotonic()
        ok = step() and ok
        say(f"  ({time.monotonic() - started:.1f}s)")
    say("scan: passed" if ok else "scan: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
