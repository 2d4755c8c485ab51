"""The layers hold: the import-linter contracts pass, and no import hides in a function.

The contracts (pyproject.toml, ``[tool.importlinter]``) say that the apps import only downward
(core, audit, accounts, the secrets store, vms, webhooks, the site), that no two modules of a
package import each other in a circle, that the hypervisor drivers and the network plumbing know no Django, and that the
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
PACKAGES = ("core", "audit", "accounts", "secretstore", "vms", "webhooks", "sandbox_site")

# (file, imported module) -> why the import must run inside the function.
# Django's rule: an app's module that loads models may be imported only once the registry is
# ready, so AppConfig.ready() is where an app connects its receivers and registers collectors.
APP_REGISTRY = "AppConfig.ready: loads the app's models, which need the app registry"
ALLOWED_IN_FUNCTIONS: dict[tuple[str, str], str] = {
    ("accounts/apps.py", "accounts"): APP_REGISTRY,  # signals
    ("audit/apps.py", "audit"): APP_REGISTRY,  # metrics
    ("vms/apps.py", "vms"): APP_REGISTRY,  # metrics, templates_config
    ("webhooks/apps.py", "webhooks"): APP_REGISTRY,  # metrics, the worker tick
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


# --- Imports by name at run time ----------------------------------------------------------------

# The layers, lowest first: a module may name (import, load a model of) only its own layer and
# those below it, by a static import or by a string.
LAYERS = ("core", "audit", "accounts", "secretstore", "vms", "webhooks", "sandbox_site")
# The calls that import a module or load a model named by a string.
DYNAMIC_IMPORTS = frozenset({"import_module", "__import__", "import_string", "get_model"})
DYNAMIC = "<not a literal>"

# (file, call) -> why the call takes a name that is not a literal, which no scan can check.
ALLOWED_DYNAMIC: dict[tuple[str, str], str] = {
    ("audit/sink.py", "import_module"): (
        "the digest sink is a class named in settings (SANDBOX_DIGEST_SINK_CLASS), so that a "
        "deployment can copy digests elsewhere; the default is audit's own FileSink"
    ),
    ("accounts/authentication.py", "import_module"): (
        "Django's session engine, named by SESSION_ENGINE (django.contrib.sessions.backends.*), "
        "the way django.contrib.sessions.middleware loads it"
    ),
}


def _call_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def dynamic_imports(
    root: Path = ROOT, layers: tuple[str, ...] = LAYERS
) -> tuple[set[tuple[str, str, str]], set[tuple[str, str]]]:
    """(upward, unchecked): the calls of ``DYNAMIC_IMPORTS`` whose literal names a package of a
    higher layer than the caller's, as (file, call, package); and those whose name is not a
    literal, as (file, call)."""
    upward: set[tuple[str, str, str]] = set()
    unchecked: set[tuple[str, str]] = set()
    for level, package in enumerate(layers):
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if "/migrations/" in rel:
                continue  # a migration's apps.get_model names its own dependencies' models
            for node in ast.walk(parse(path.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                call = _call_name(node.func)
                if call not in DYNAMIC_IMPORTS:
                    continue
                first = node.args[0] if node.args else None
                if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                    unchecked.add((rel, call))
                    continue
                # "vms.models", "vms.recordings.replay", "vms.VirtualMachine", "vms": the
                # package (for apps.get_model, the app label) is what comes before the first dot.
                named = first.value.split(".")[0]
                if named in layers and layers.index(named) > level:
                    upward.add((rel, call, named))
    return upward, unchecked


def test_no_dynamic_import_reaches_an_upper_layer() -> None:
    upward, unchecked = dynamic_imports()
    assert not upward, (
        "a module names a package of a higher layer in an import by string or a model lookup "
        f"(register from the upper app instead, the way audit.catalogue.register works): {upward}"
    )
    unexplained = sorted(unchecked - set(ALLOWED_DYNAMIC))
    assert not unexplained, (
        "imports by a name that is not a literal cannot be checked against the layers; list one "
        f"in ALLOWED_DYNAMIC only with the reason it must be: {unexplained}"
    )
    stale = sorted(set(ALLOWED_DYNAMIC) - unchecked)
    assert not stale, f"listed but no longer there (remove from ALLOWED_DYNAMIC): {stale}"


def test_the_scan_sees_a_dynamic_import_of_an_upper_layer(tmp_path: Path) -> None:
    """The scan itself: each form of import by string and model lookup that names a higher
    layer is found; one of the caller's layer or below is not; a name that is not a literal is
    reported apart; migrations are not read."""
    for package in ("core", "audit", "vms"):
        (tmp_path / package / "migrations").mkdir(parents=True)
    (tmp_path / "audit" / "m.py").write_text(
        "import importlib\n"
        "from importlib import import_module\n"
        "from django.apps import apps\n"
        "from django.utils.module_loading import import_string\n"
        "from django.conf import settings\n\n"
        "def f():\n"
        "    importlib.import_module('vms.recordings')\n"
        "    import_module('accounts')\n"
        "    __import__('sandbox_site.urls')\n"
        "    import_string('vms.recordings.replay')\n"
        "    apps.get_model('vms.VirtualMachine')\n"
        "    apps.get_model('accounts', 'APIToken')\n"
        "    importlib.import_module('audit.sink')\n"
        "    importlib.import_module('core.metrics')\n"
        "    apps.get_model('audit', 'Event')\n"
        "    import_string('django.core.cache.cache')\n"
        "    importlib.import_module(settings.SOME_CLASS)\n"
    )
    (tmp_path / "vms" / "m.py").write_text(
        "import importlib\nimportlib.import_module('audit.store')\n"
        "importlib.import_module('sandbox_site.urls')\n"
    )
    (tmp_path / "vms" / "migrations" / "0002.py").write_text(
        "def f(apps):\n    apps.get_model('sandbox_site', 'X')\n"
    )
    (tmp_path / "core" / "m.py").write_text("x = __import__('audit')\n")
    upward, unchecked = dynamic_imports(
        tmp_path, ("core", "audit", "accounts", "vms", "sandbox_site")
    )
    assert upward == {
        ("audit/m.py", "import_module", "vms"),
        ("audit/m.py", "import_module", "accounts"),
        ("audit/m.py", "__import__", "sandbox_site"),
        ("audit/m.py", "import_string", "vms"),
        ("audit/m.py", "get_model", "vms"),
        ("audit/m.py", "get_model", "accounts"),
        ("vms/m.py", "import_module", "sandbox_site"),
        ("core/m.py", "__import__", "audit"),
    }
    assert unchecked == {("audit/m.py", "import_module")}
