"""``sandbox mcp``, the MCP server, driven by the official MCP client (the ``mcp`` package) over
stdio (``sandbox mcp`` as a subprocess) and streamable HTTP, against the product served for
real: the tools it lists per token, a real guest through them, and the API's refusals (and
their audit records) when a token may not do what a tool asks."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from sandbox_sdk import Client, Sandbox

from tests.served import free_port

pytestmark = pytest.mark.django_db(transaction=True)

ENTRY = Path(sys.executable).parent / "sandbox"
ALL_TOOLS = {
    "list_templates",
    "list_sandboxes",
    "create_sandbox",
    "exec",
    "read_file",
    "write_file",
    "snapshot_sandbox",
    "start_sandbox",
    "stop_sandbox",
    "destroy_sandbox",
}
READ_TOOLS = {"list_templates", "list_sandboxes", "read_file"}


def process_env(url: str, token: str | None, home: Path) -> dict[str, str]:
    """What ``sandbox mcp`` is started with: the server, maybe a token, a config dir of the
    test's own (no login file), and the import path of this checkout."""
    env = {"SANDBOX_URL": url, "XDG_CONFIG_HOME": str(home), "PATH": os.environ["PATH"]}
    if token is not None:
        env["SANDBOX_TOKEN"] = token
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


@contextlib.asynccontextmanager
async def over_stdio(
    url: str, token: str, home: Path, *args: str, log: Path | None = None
) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(
        command=str(ENTRY), args=["mcp", *args], env=process_env(url, token, home)
    )
    with (log or home / "mcp-stdio.log").open("a") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


class HTTPMCP:
    """``sandbox mcp --transport streamable-http`` on a free port of 127.0.0.1."""

    def __init__(self, url: str, home: Path, *args: str) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/mcp"
        self.log = home / "mcp-http.log"
        argv = [str(ENTRY), "mcp", "--transport", "streamable-http", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*argv, *args],
            env=process_env(url, None, home),
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60) -> HTTPMCP:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return self
            time.sleep(0.2)
        raise AssertionError(f"sandbox mcp did not listen: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def http_mcp(sdk_env: Any, tmp_path: Path) -> Iterator[HTTPMCP]:
    server = HTTPMCP(sdk_env.url, tmp_path, "--max-output", "1000")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def over_http(endpoint: str, token: str) -> AsyncIterator[ClientSession]:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300)) as http:
        async with streamable_http_client(endpoint, http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    """A tool's structured result; a tool error fails the test with its text."""
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, (tool, result.content)
    assert result.structured_content is not None
    return result.structured_content


async def refused(session: ClientSession, tool: str, **arguments: Any) -> str:
    """The text of a tool error (the call must fail)."""
    result = await session.call_tool(tool, arguments)
    assert result.is_error, (tool, result.structured_content)
    return " ".join(getattr(c, "text", "") for c in result.content)


async def names(session: ClientSession) -> set[str]:
    return {t.name for t in (await session.list_tools()).tools}


def rejections(token: str) -> list[dict[str, Any]]:
    from audit.models import Event

    key = token.split("_")[1]
    return [e.payload for e in Event.objects.filter(type="auth.token_rejected", aggregate_id=key)]


@pytest.mark.guest
def test_a_sandbox_through_mcp_over_stdio_and_http(
    sdk_env, worker, http_mcp, make_user, issue_token, tmp_path
) -> None:
    """One guest, driven through the tools: created, exec'd in, files both ways, bounded
    output and files, a snapshot, the same guest over HTTP with the client's own token, a
    token without the exec scope refused there, and destroyed. Each call is the API's, in the
    VM's timeline under the token that made it."""
    from audit.models import Event

    owner = make_user("operator", "agent")
    token, http_token = issue_token(owner), issue_token(owner, name="http")
    no_exec = issue_token(owner, name="reader", scopes=["vms.read_files"])
    url = sdk_env.url

    async def over_stdio_first() -> dict[str, Any]:
        flags = ("--max-output", "1000", "--max-file", "4096")
        async with over_stdio(url, token, tmp_path, *flags) as mcp:
            listed = (await mcp.list_tools()).tools
            assert {t.name for t in listed} == ALL_TOOLS
            for t in listed:  # every tool says what it does and what it takes
                assert t.description and t.input_schema["type"] == "object", t
            schema = next(t for t in listed if t.name == "exec").input_schema
            assert set(schema["required"]) == {"sandbox", "command"}
            templates = await call(mcp, "list_templates")
            assert "linux-small" in [t["name"] for t in templates["templates"]]

            vm = await call(
                mcp, "create_sandbox", template="linux-small", name="mcp-1", timeout_s=240
            )
            assert (vm["name"], vm["state"]) == ("mcp-1", "running")
            listed_vms = await call(mcp, "list_sandboxes")
            assert [v["id"] for v in listed_vms["sandboxes"]] == [vm["id"]]

            ran = await call(mcp, "exec", sandbox="mcp-1", command="echo hi; echo oops >&2; exit 3")
            assert (ran["exit_code"], ran["stdout"], ran["stderr"]) == (3, "hi\n", "oops\n")
            assert not ran["stdout_truncated"] and ran["stdout_size"] == 3
            ran = await call(
                mcp,
                "exec",
                sandbox=vm["id"],
                command=["sh", "-c", 'read x; echo "$x $GREETING $(pwd)"'],
                stdin="hello\n",
                env={"GREETING": "world"},
                cwd="/tmp",
            )
            assert (ran["exit_code"], ran["stdout"]) == (0, "hello world /tmp\n")
            # Bounded output: the first --max-output bytes, the full size, and the flag.
            big = await call(
                mcp, "exec", sandbox="mcp-1", command="head -c 5000 /dev/zero | tr '\\0' a"
            )
            assert big["stdout"] == "a" * 1000 and big["stdout_truncated"]
            assert big["stdout_size"] == 5000 and not big["stderr_truncated"]
            timed = await call(mcp, "exec", sandbox="mcp-1", command="sleep 30", timeout_s=1)
            assert timed["timed_out"]

            # Files: text as text, other bytes as base64, SHA-256 as the guest has it.
            wrote = await call(
                mcp, "write_file", sandbox="mcp-1", path="/data/notes.txt", content="ünïcode\n"
            )
            assert wrote["size"] == len("ünïcode\n".encode())
            got = await call(mcp, "read_file", sandbox="mcp-1", path="/data/notes.txt")
            assert (got["encoding"], got["content"]) == ("utf-8", "ünïcode\n")
            blob = bytes(range(256)) * 4
            await call(
                mcp,
                "write_file",
                sandbox="mcp-1",
                path="/data/blob.bin",
                content=base64.b64encode(blob).decode(),
                encoding="base64",
            )
            got = await call(mcp, "read_file", sandbox="mcp-1", path="/data/blob.bin")
            assert got["encoding"] == "base64" and base64.b64decode(got["content"]) == blob
            check = await call(mcp, "exec", sandbox="mcp-1", command="sha256sum /data/blob.bin")
            assert check["stdout"].split()[0] == hashlib.sha256(blob).hexdigest() == got["sha256"]
            # Bounded files: a larger file is refused whole, in both directions.
            await call(mcp, "exec", sandbox="mcp-1", command="head -c 5000 /dev/zero > /data/big")
            too_big = await refused(mcp, "read_file", sandbox="mcp-1", path="/data/big")
            assert "TooLarge" in too_big and "5000 bytes" in too_big and "4096" in too_big
            too_big = await refused(
                mcp, "write_file", sandbox="mcp-1", path="/data/new", content="x" * 5000
            )
            assert "5000 bytes, more than the 4096 allowed" in too_big
            left = await call(mcp, "exec", sandbox="mcp-1", command="test -e /data/new")
            assert left["exit_code"] == 1  # nothing was written
            # Invalid input never reaches the API: the schema refuses it.
            assert "timeout_s" in await refused(
                mcp, "exec", sandbox="mcp-1", command="true", timeout_s=0
            )
            missing = await refused(mcp, "exec", sandbox="no-such-vm", command="true")
            assert "NotFound" in missing and "no VM named 'no-such-vm'" in missing

            snap = await call(mcp, "snapshot_sandbox", sandbox="mcp-1", name="clean")
            assert (snap["name"], snap["state"], snap["vm"]) == ("clean", "ready", vm["id"])
            return vm

    vm = asyncio.run(over_stdio_first())

    async def over_http_then() -> None:
        async with over_http(http_mcp.endpoint, http_token) as mcp:
            assert await names(mcp) == ALL_TOOLS
            ran = await call(mcp, "exec", sandbox="mcp-1", command="hostname; cat /data/notes.txt")
            assert ran["stdout"] == "mcp-1\nünïcode\n"
        async with over_http(http_mcp.endpoint, no_exec) as mcp:
            assert await names(mcp) == READ_TOOLS  # exec is not offered to this token ...
            got = await call(mcp, "read_file", sandbox="mcp-1", path="/data/notes.txt")
            assert got["content"] == "ünïcode\n"
            # ... and called all the same, the API refuses it with its reason.
            text = await refused(mcp, "exec", sandbox="mcp-1", command="touch /data/pwned")
            assert "Forbidden: 403" in text and "do not include vms.exec_vm" in text, text

    asyncio.run(over_http_then())
    assert [r["reason"] for r in rejections(no_exec)] == ["out_of_scope"]

    async def destroy() -> dict[str, Any]:
        async with over_stdio(url, token, tmp_path) as mcp:
            pwned = await call(mcp, "exec", sandbox="mcp-1", command="test -e /data/pwned")
            assert pwned["exit_code"] == 1  # the refused exec never ran
            return await call(mcp, "destroy_sandbox", sandbox="mcp-1")

    assert asyncio.run(destroy())["state"] == "destroyed"

    # The VM's timeline: each tool call an API call, under the token that made it.
    timeline = list(Event.objects.filter(aggregate_id=vm["id"]).order_by("position"))
    key = {t.split("_")[1]: name for t, name in ((token, "stdio"), (http_token, "http"))}
    execs = [key.get(e.token_id) for e in timeline if e.type == "vm.exec_completed"]
    assert execs.count("http") == 1 and execs.count("stdio") >= 8
    kinds = [e.type for e in timeline]
    for step in ("vm.file_uploaded", "vm.file_downloaded", "vm.snapshotted", "vm.destroyed"):
        assert step in kinds, kinds
    reader = no_exec.split("_")[1]
    assert not [e for e in timeline if e.token_id == reader and e.type.startswith("vm.exec")]


def test_tools_follow_the_tokens_scopes_and_the_api_refuses_the_rest(
    sdk_env, make_user, issue_token, tmp_path
) -> None:
    """No guest needed: what each token is offered, and what the API answers and records when
    a hidden tool is called all the same."""
    owner = make_user("operator", "owner")
    full = issue_token(owner)
    stopped = Sandbox.create(
        template="linux-small", name="idle", start=False, client=Client(token=full)
    )
    read_only = issue_token(owner, name="ro", read_only=True)
    no_exec = issue_token(owner, name="files", scopes=["vms.read_files", "vms.write_files"])
    viewer = issue_token(make_user("viewer", "watcher"))

    async def offered() -> dict[str, set[str]]:
        seen = {}
        for name, tok in (("full", full), ("ro", read_only), ("files", no_exec), ("v", viewer)):
            async with over_stdio(sdk_env.url, tok, tmp_path) as mcp:
                seen[name] = await names(mcp)
        return seen

    seen = asyncio.run(offered())
    assert seen["full"] == ALL_TOOLS
    assert seen["ro"] == READ_TOOLS
    assert seen["files"] == READ_TOOLS | {"write_file"}
    assert seen["v"] == {"list_templates", "list_sandboxes"}  # a viewer reads no guest files

    async def hidden_tools_called() -> tuple[str, str, str, list[dict[str, Any]]]:
        async with over_stdio(sdk_env.url, no_exec, tmp_path) as mcp:
            scope = await refused(mcp, "exec", sandbox="idle", command="id")
        async with over_stdio(sdk_env.url, read_only, tmp_path) as mcp:
            ro = await refused(mcp, "destroy_sandbox", sandbox="idle")
        async with over_stdio(sdk_env.url, viewer, tmp_path) as mcp:
            role = await refused(mcp, "start_sandbox", sandbox=stopped.id)
            vms = (await call(mcp, "list_sandboxes"))["sandboxes"]
        return scope, ro, role, vms

    scope, ro, role, vms = asyncio.run(hidden_tools_called())
    assert scope == (
        "Error executing tool exec: Forbidden: 403: "
        "This API token's scopes do not include vms.exec_vm."
    )
    assert "Forbidden: 403: This API token is read-only." in ro
    assert "Forbidden: 403" in role
    assert [v["name"] for v in vms] == ["idle"]  # a viewer sees every VM, drives none
    assert [r["reason"] for r in rejections(no_exec)] == ["out_of_scope"]
    assert [r["reason"] for r in rejections(read_only)] == ["read_only"]
    # Nothing refused changed anything.
    assert Sandbox.connect(stopped.id, client=Client(token=full)).state == "stopped"


def test_http_clients_bring_their_own_tokens(sdk_env, http_mcp, make_user, issue_token) -> None:
    """Over HTTP the server has no token: a request without one, or with one the API refuses,
    gets a 401 before any MCP message is read; each client is offered what its token may do;
    a session belongs to the token that opened it."""
    owner = make_user("operator", "owner")
    full, read_only = issue_token(owner), issue_token(owner, name="ro", read_only=True)
    hello = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"},
        },
    }
    accept = {"Accept": "application/json, text/event-stream"}
    for headers in ({}, {"Authorization": "Bearer sbx_wrong"}, {"Authorization": "Basic eDp5"}):
        answer = httpx.post(http_mcp.endpoint, json=hello, headers={**accept, **headers})
        assert answer.status_code == 401, answer.text
        assert answer.headers["www-authenticate"].startswith("Bearer")
    opened = httpx.post(
        http_mcp.endpoint, json=hello, headers={**accept, "Authorization": f"Bearer {full}"}
    )
    assert opened.status_code == 200, opened.text
    session = opened.headers["mcp-session-id"]
    # Another token cannot use that session: as if it did not exist.
    hijack = httpx.post(
        http_mcp.endpoint,
        json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        headers={**accept, "Authorization": f"Bearer {read_only}", "mcp-session-id": session},
    )
    assert hijack.status_code == 404, hijack.text
    # Bound to 127.0.0.1, it answers loopback names only (DNS rebinding).
    mine = {**accept, "Authorization": f"Bearer {full}"}
    elsewhere = httpx.post(http_mcp.endpoint, json=hello, headers={**mine, "Host": "evil.example"})
    assert elsewhere.status_code == 421, elsewhere.text
    page = httpx.post(
        http_mcp.endpoint, json=hello, headers={**mine, "Origin": "http://evil.example"}
    )
    assert page.status_code == 403, page.text

    async def both() -> tuple[set[str], set[str]]:
        async with (
            over_http(http_mcp.endpoint, full) as a,
            over_http(http_mcp.endpoint, read_only) as b,
        ):
            return await names(a), await names(b)

    assert asyncio.run(both()) == (ALL_TOOLS, READ_TOOLS)

    # A token revoked while the server still trusts what the API said of it a moment ago: the
    # tool's own API call carries it, and the API refuses it.
    async def revoked_midway() -> str:
        bearer = {"Authorization": f"Bearer {full}"}
        async with (
            over_http(http_mcp.endpoint, full) as mcp,
            httpx.AsyncClient(base_url=sdk_env.url, headers=bearer) as api,
        ):
            assert (await call(mcp, "list_sandboxes"))["count"] == 0
            mine = (await api.get("/api/v1/tokens/")).json()["results"]
            (row,) = [t for t in mine if t["key"] == full.split("_")[1]]
            assert (await api.delete(f"/api/v1/tokens/{row['id']}/")).status_code == 204
            return await refused(mcp, "list_sandboxes")

    assert "AuthError: 401: Token revoked." in asyncio.run(revoked_midway())


def test_sandbox_mcp_needs_a_token_the_api_accepts(sdk_env, tmp_path) -> None:
    """Over stdio the token is checked at start: none, or a refused one, exits at once with
    the CLI's one-line error and exit code (8: not authenticated)."""
    for token, says in ((None, "no token"), ("sbx_wrong", "401")):
        done = subprocess.run(
            [str(ENTRY), "mcp"],
            env=process_env(sdk_env.url, token, tmp_path),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 8, (done.stdout, done.stderr)
        assert done.stderr.startswith("sandbox: ") and says in done.stderr, done.stderr
        assert done.stdout == ""  # nothing on the protocol's channel


def test_the_http_server_says_when_the_api_cannot_check_a_token(tmp_path) -> None:
    """No API at its URL: a request is refused with that reason, never let through."""
    server = HTTPMCP(f"http://127.0.0.1:{free_port()}", tmp_path).wait_ready()
    try:
        answer = httpx.post(
            server.endpoint,
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            headers={"Authorization": "Bearer sbx_some_token"},
            timeout=120,
        )
    finally:
        server.stop()
    assert answer.status_code == 400
    assert answer.text.startswith("the sandbox API cannot check the token: cannot reach")


def test_without_the_mcp_extra_the_command_says_what_to_install(tmp_path) -> None:
    code = (
        "import sys; sys.modules['mcp'] = None\n"  # as if the extra were not installed
        "from sandbox_sdk.cli import main; main(['mcp'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=process_env("http://127.0.0.1:9", "sbx_x_y", tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'microvm-sandbox-sdk[mcp]'" in done.stderr


def test_the_cli_page_shows_the_help_as_it_is(tmp_path) -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    shown = page.split("`sandbox mcp --help`:\n\n```text\n", 1)[1].split("```", 1)[0]
    env = {**process_env("http://127.0.0.1:9", None, tmp_path), "COLUMNS": "80"}
    helped = subprocess.run(
        [str(ENTRY), "mcp", "--help"], env=env, capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0 and helped.stdout == shown
