"""Only command modules append events: a scan of the product code (``ast``, no import) fails when
anything outside ``*/commands.py`` and the event store itself calls the store's append functions.

Views, consumers, tasks, workers and helpers record what they do by calling a command function,
which checks, appends and updates the inline read models in one place (docs/event-store.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.astutil import parse

ROOT = Path(__file__).resolve().parents[1]
# The product's packages (tests, benches and the SDK use the store as they need to).
PRODUCT = ("core", "audit", "accounts", "secretstore", "vms", "webhooks", "sandbox_site", "images")
STORE_MODULE = "audit.store"
APPEND_FUNCTIONS = frozenset({"append", "append_many"})
ALLOWED = {Path("audit/store.py")}


def _product_files() -> list[Path]:
    files = []
    for package in PRODUCT:
        base = ROOT / package
        if base.is_dir():
            files += sorted(p for p in base.rglob("*.py") if "migrations" not in p.parts)
    return files


def appends_in(source: str) -> list[tuple[int, str]]:
    """(line, call) of every call to the store's append functions in ``source``, however the
    store or the functions were imported (module, alias, or the functions themselves)."""
    tree = parse(source)
    store_names: set[str] = set()  # names bound to the audit.store module
    function_names: set[str] = set()  # names bound to its append functions
    package_names: set[str] = set()  # names bound to the audit package
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "audit":
            store_names |= {a.asname or a.name for a in node.names if a.name == "store"}
        elif isinstance(node, ast.ImportFrom) and node.module == STORE_MODULE:
            function_names |= {a.asname or a.name for a in node.names if a.name in APPEND_FUNCTIONS}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == STORE_MODULE and alias.asname:
                    store_names.add(alias.asname)
                elif alias.name in (STORE_MODULE, "audit"):
                    package_names.add("audit")
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in function_names:
            found.append((node.lineno, func.id))
        elif isinstance(func, ast.Attribute) and func.attr in APPEND_FUNCTIONS:
            target = func.value
            if isinstance(target, ast.Name) and target.id in store_names:
                found.append((node.lineno, f"{target.id}.{func.attr}"))
            elif (
                isinstance(target, ast.Attribute)
                and target.attr == "store"
                and isinstance(target.value, ast.Name)
                and target.value.id in package_names
            ):
                found.append((node.lineno, f"audit.store.{func.attr}"))
    return sorted(found)


def test_only_command_modules_append_events() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {call}(...)"
        for path in _product_files()
        if path.name != "commands.py" and path.relative_to(ROOT) not in ALLOWED
        for line, call in appends_in(path.read_text())
    ]
    assert offenders == [], "append through a command function (*/commands.py):\n" + "\n".join(
        offenders
    )


def test_the_scan_finds_every_way_of_calling_append() -> None:
    source = """
from audit import store
from audit import store as s
from audit.store import append, append_many as many
import audit.store
import audit.store as st
store.append("vm", "1", "vm.crashed", actor=a)
s.append_many([], actor=a)
append("vm", "1", "vm.crashed", actor=a)
many([], actor=a)
audit.store.append("vm", "1", "vm.crashed", actor=a)
st.append("vm", "1", "vm.crashed", actor=a)
items.append(1)
store.head()
"""
    assert [call for _, call in appends_in(source)] == [
        "store.append",
        "s.append_many",
        "append",
        "many",
        "audit.store.append",
        "st.append",
    ]


def test_the_scan_covers_the_product() -> None:
    scanned = {p.relative_to(ROOT) for p in _product_files()}
    assert Path("vms/views.py") in scanned and Path("audit/exports.py") in scanned
    assert len(scanned) > 50
