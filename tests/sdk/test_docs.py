"""docs/sdk.md's Python examples, run as they are against the served product and real guests."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.guest, pytest.mark.django_db(transaction=True)]

DOC = Path(__file__).resolve().parents[2] / "docs" / "sdk.md"


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def run(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {"__name__": "docs_example"})  # noqa: S102
    return out.getvalue()


def test_the_sdk_pages_examples_run(sdk_env, worker, make_user, issue_token, monkeypatch) -> None:
    from vms.models import Quota, VirtualMachine

    owner = make_user("operator", "docs")
    monkeypatch.setenv("SANDBOX_TOKEN", issue_token(owner))
    sandbox, console, asynchronous, errors = examples()

    printed = run(sandbox)
    assert "0 hello from demo" in printed and "exit 0" in printed
    assert [line for line in printed.splitlines() if line.startswith("stdout ")][:3] == [
        "stdout 1",
        "stdout 2",
        "stdout 3",
    ]
    assert "'type': 'session', 'session'" in run(console)
    assert run(asynchronous).endswith("a\nb\n")

    Quota.objects.create(user=owner, max_vms=0)
    assert run(errors) == "over the user quota vms: 0 of 0 in use\n"
    # Every example's VM was destroyed at the end of its block.
    assert set(VirtualMachine.objects.values_list("state", flat=True)) == {"destroyed"}
