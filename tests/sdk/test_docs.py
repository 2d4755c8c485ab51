"""docs/sdk.md's and docs/mcp.md's examples, run as they are against the served product and real
guests."""

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
    return run_at(code, DOC)


def run_at(code: str, page: Path) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(page), "exec"), {"__name__": "docs_example"})  # noqa: S102
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


MCP_DOC = DOC.parent / "mcp.md"


def test_the_mcp_pages_examples_run(
    sdk_env, worker, make_user, issue_token, monkeypatch, tmp_path
) -> None:
    """docs/mcp.md: both client configurations start a server that answers with its tools,
    and both Python clients run as written (the stdio one on a real guest)."""
    import asyncio
    import json
    import os
    import sys

    import httpx
    import mcp.client.stdio
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    from tests.sdk.test_mcp import ALL_TOOLS, HTTPMCP

    text = MCP_DOC.read_text()
    stdio_config, http_config = (
        json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, re.S)
    )
    stdio_example, http_example = re.findall(r"```python\n(.*?)```", text, re.S)
    token = issue_token(make_user("operator", "docs"))
    monkeypatch.setenv("SANDBOX_TOKEN", token)
    bin_dir = str(Path(sys.executable).parent)  # where `sandbox` is, as the page says
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    if os.environ.get("PYTHONPATH"):  # a checkout other than the installed one
        inherited = [*mcp.client.stdio.DEFAULT_INHERITED_ENV_VARS, "PYTHONPATH"]
        monkeypatch.setattr(mcp.client.stdio, "DEFAULT_INHERITED_ENV_VARS", inherited)

    entry = stdio_config["mcpServers"]["microvm-sandbox"]
    assert (entry["command"], entry["args"]) == ("sandbox", ["mcp"])
    assert set(entry["env"]) == {"SANDBOX_URL", "SANDBOX_TOKEN"}

    async def configured() -> set[str]:
        env = {"SANDBOX_URL": sdk_env.url, "SANDBOX_TOKEN": token}
        params = StdioServerParameters(command=entry["command"], args=entry["args"], env=env)
        with (tmp_path / "stdio.log").open("a") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    return {t.name for t in (await session.list_tools()).tools}

    assert asyncio.run(configured()) == ALL_TOOLS
    printed = run_at(stdio_example, MCP_DOC)
    lines = printed.splitlines()
    assert lines[0] == str(sorted(ALL_TOOLS))
    assert lines[1:] == ["running", "3 Linux"], printed

    server = HTTPMCP(sdk_env.url, tmp_path).wait_ready()
    try:
        remote = http_config["mcpServers"]["microvm-sandbox"]
        assert remote["type"] == "http" and remote["url"] in http_example
        headers = {
            k: v.replace("sbx_yourkey_yoursecret", token) for k, v in remote["headers"].items()
        }
        hello = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "docs", "version": "0"},
            },
        }
        answer = httpx.post(
            server.endpoint,
            json=hello,
            headers={**headers, "Accept": "application/json, text/event-stream"},
        )
        assert answer.status_code == 200, answer.text
        printed = run_at(http_example.replace(remote["url"], server.endpoint), MCP_DOC)
        assert printed.splitlines() == [str(sorted(ALL_TOOLS)), "0 sandboxes"], printed
    finally:
        server.stop()
