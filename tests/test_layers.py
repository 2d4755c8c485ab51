"""The layers hold: the import-linter contracts pass, and no import hides in a function.

The contracts (pyproject.toml, ``[tool.importlinter]``) say that the apps import only downward
(core, audit, accounts, vms, the site), that no two modules of a package import each other in a
circle, that the hypervisor drivers and the network plumbing know no Django, and that the
drivers' wire formats stay under ``vms.hypervisors``. import-linter sees imports inside
functions too, so a circle cannot hide there; the second test keeps such imports from coming
back for any other reason than the few listed, each with the reason it must stay.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from tests.astutil import parse

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "audit", "accounts", "vms", "sandbox_site")

# (file, imported module) -> why the import must run inside the function.
# Django's rule: an app's module that loads models may be imported only once the registry is
# ready, so AppConfig.ready() is where an app connects its receivers and registers collectors.
APP_REGISTRY = "AppConfig.ready: loads the app's models, which need the app registry"
ALLOWED_IN_FUNCTIONS: dict[tuple[str, str], str] = {
    ("accounts/apps.py", "accounts"): APP_REGISTRY,  # signals
    ("audit/apps.py", "audit"): APP_REGISTRY,  # metrics
    ("vms/apps.py", "vms"): APP_REGISTRY,  # metrics, templates_config
}


def function_level_imports(
    root: Path = ROOT, packages: tuple[str, ...] = PACKAGES
) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if "/migrations/" in rel:
                continue
            tree = parse(path.read_text())
            for node in ast.walk(tree):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and inner.level == 0 and inner.module:
                        modules = [inner.module]
                    elif isinstance(inner, ast.Import):
                        modules = [alias.name for alias in inner.names]
                    else:
                        continue
                    for module in modules:
                        if module.split(".")[0] in packages:
                            found.add((rel, module))
    return found


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(  # noqa: S603 (fixed argv)
        [str(lint), "--no-cache"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower().replace("0 broken", "")


def test_no_import_hides_in_a_function() -> None:
    found = function_level_imports()
    unexplained = sorted(found - set(ALLOWED_IN_FUNCTIONS))
    assert not unexplained, (
        "imports inside functions (move them to the module's top, or move the shared piece "
        f"down a layer; list one here only with the reason it cannot be): {unexplained}"
    )
    stale = sorted(set(ALLOWED_IN_FUNCTIONS) - found)
    assert not stale, f"listed but no longer there (remove from ALLOWED_IN_FUNCTIONS): {stale}"


def test_the_scan_sees_an_import_in_a_function(tmp_path: Path) -> None:
    """The scan itself: imports of the apps inside functions (nested ones too) are found; a
    module-level one, a relative one and a standard-library one are not."""
    (tmp_path / "vms").mkdir()
    (tmp_path / "vms" / "m.py").write_text(
        "import vms.models\nfrom . import x\n\n"
        "def f():\n    import json\n    from audit import store\n\n"
        "    async def g():\n        import accounts.roles\n    return store, json\n"
    )
    assert function_level_imports(tmp_path, ("vms",)) == set()
    assert function_level_imports(tmp_path, ("vms", "audit", "accounts")) == {
        ("vms/m.py", "audit"),
        ("vms/m.py", "accounts.roles"),
    }
