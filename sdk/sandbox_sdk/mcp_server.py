"""``sandbox mcp``: sandboxes as Model Context Protocol tools, over stdio or streamable HTTP
(docs/mcp.md). Needs the ``mcp`` extra: ``pip install 'microvm-sandbox-sdk[mcp]'``.

The server holds no privilege of its own. Every tool is one or a few calls of the public REST
API (through this SDK) made with the caller's API token: over stdio the token of the process
(``SANDBOX_TOKEN`` or the ``sandbox login`` file), over HTTP the bearer token of each HTTP
request, so each HTTP client acts as its own token. The API decides what the token may do and
records it as for any client (an exec is ``vm.exec_*``, a refusal ``auth.token_rejected``).
``tools/list`` shows only the tools the token's user, scopes and read-only flag allow
(``GET /api/v1/me/``); a hidden tool called all the same goes to the API, which refuses it.

What the tools move is bounded: an exec's output (``--max-output`` bytes of each stream, the
rest reported as truncated with the full sizes) and a file read or written (``--max-file``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import Tool as MCPTool
from mcp.types import ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field
from starlette.authentication import AuthenticationError

from sandbox_sdk import _core
from sandbox_sdk.aio import AsyncClient
from sandbox_sdk.errors import AuthError, Forbidden, SandboxError

__all__ = [
    "DEFAULT_MAX_FILE",
    "DEFAULT_MAX_OUTPUT",
    "TOOLS",
    "APITokenVerifier",
    "Limits",
    "SandboxMCP",
    "may_use",
]

log = logging.getLogger("sandbox_sdk.mcp")

DEFAULT_MAX_OUTPUT = 64 * 1024  # bytes of each of stdout and stderr an exec returns
DEFAULT_MAX_FILE = 1024 * 1024  # bytes a read or a write moves
CREATE_TIMEOUT_S = 300.0
VERIFY_TTL_S = 10.0  # how long the HTTP server trusts the API's word on a token
VERIFY_CACHE_SIZE = 1024  # tokens remembered at most

INSTRUCTIONS = """\
MicroVM Sandbox: isolated Linux VMs to run commands in. Create a sandbox (list_templates
names the templates), run commands in it with exec, move files with read_file and write_file,
snapshot it, and destroy it when done. A sandbox is named by its id or its exact name. Every
call is an API call made with your API token: what it may not do is refused with the API's
reason, and every call is recorded in the product's audit log."""


# --- What each tool needs -----------------------------------------------------------------------

# Reading VMs accepts their view permissions or any permission that acts on them (docs/accounts.md).
VM_READ = frozenset(
    {
        "vms.view_virtualmachine",
        "vms.view_snapshot",
        "vms.add_virtualmachine",
        "vms.operate_vm",
        "vms.delete_virtualmachine",
        "vms.exec_vm",
        "vms.read_files",
        "vms.write_files",
        "vms.console_vm",
        "vms.snapshot_vm",
        "vms.rollback_snapshot",
    }
)


@dataclass(frozen=True)
class Need:
    """What the API asks of a token for a tool's calls: one of ``any_of`` (none: open to every
    token), and a token that may write when ``write``."""

    any_of: frozenset[str]
    write: bool


def may_use(me: dict[str, Any], need: Need) -> bool:
    """Whether the caller ``GET /api/v1/me/`` describes may make a tool's calls: its user holds
    one of the permissions, its token's scopes (if any) name it, and a read-only token only
    reads. The API applies the same rules to every call: this only spares the model tools that
    would be refused."""
    if need.write and me.get("token_read_only"):
        return False
    if not need.any_of:
        return True
    held = set(me.get("permissions") or [])
    scopes = me.get("token_scopes") or []
    if scopes:
        held &= set(scopes)
    return bool(held & need.any_of)


@dataclass(frozen=True)
class ToolSpec:
    name: str
    fn: Callable[..., Awaitable[Any]]
    need: Need
    annotations: ToolAnnotations


TOOLS: dict[str, ToolSpec] = {}


def tool(
    name: str, need: Need, *, read_only: bool, destructive: bool = False, idempotent: bool = False
) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    def register(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        hints = ToolAnnotations(
            read_only_hint=read_only,
            destructive_hint=destructive,
            idempotent_hint=idempotent,
            open_world_hint=False,
        )
        TOOLS[name] = ToolSpec(name, fn, need, hints)
        return fn

    return register


# --- The server ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    max_output: int = DEFAULT_MAX_OUTPUT
    max_file: int = DEFAULT_MAX_FILE


class APITokenVerifier:
    """An HTTP client's bearer token is checked by the API itself (``GET /api/v1/me/``, again
    after ``ttl_s``): a token the API refuses gets a 401 from the MCP endpoint; one it accepts
    carries its ``me`` (user, permissions, the token's scopes and read-only flag) to the
    tools."""

    def __init__(self, url: str, ttl_s: float = VERIFY_TTL_S) -> None:
        self.url = url
        self.ttl_s = ttl_s
        # What the API said of a token, for ttl_s (keyed by its digest, not the token): an MCP
        # exchange is several HTTP requests, and each would otherwise cost an API call. A
        # token revoked meanwhile is still refused by the API at its next tool call.
        self.accepted: OrderedDict[str, tuple[float, AccessToken]] = OrderedDict()

    async def verify_token(self, token: str) -> AccessToken | None:
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        known = self.accepted.get(key)
        if known is not None and known[0] > now:
            return known[1]
        try:
            async with AsyncClient(self.url, token) as client:
                me = await client.run(_core.request(_core.Call("GET", "/me/")))
        except (AuthError, Forbidden):
            self.accepted.pop(key, None)
            return None
        except SandboxError as exc:  # the API cannot say: the request is refused, saying why
            raise AuthenticationError(f"the sandbox API cannot check the token: {exc}") from exc
        access = AccessToken(
            token=token,
            client_id=str(me.get("token") or me.get("username")),  # one MCP session per token
            scopes=list(me.get("token_scopes") or []),
            subject=str(me.get("username")),
            claims={"me": me},
        )
        self.accepted[key] = (now + self.ttl_s, access)
        self.accepted.move_to_end(key)
        while len(self.accepted) > VERIFY_CACHE_SIZE:
            self.accepted.popitem(last=False)
        return access


class SandboxMCP(MCPServer[Any]):
    """The MCP server of one sandbox API (``url``). With ``token`` every call uses it (stdio);
    without, each HTTP request must bring its own (``Authorization: Bearer <token>``)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        limits: Limits | None = None,
        log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "WARNING",
    ) -> None:
        verifier = None if token is not None else APITokenVerifier(url)
        super().__init__(
            name="microvm-sandbox",
            instructions=INSTRUCTIONS,
            token_verifier=verifier,
            auth=None
            if verifier is None
            else AuthSettings(issuer_url=url, resource_server_url=None),  # type: ignore[arg-type]
            log_level=log_level,
        )
        self.url = url
        self.fixed_token = token
        self._client: AsyncClient | None = None
        self.limits = limits or Limits()
        for spec in TOOLS.values():
            self.add_tool(
                spec.fn, name=spec.name, annotations=spec.annotations, structured_output=True
            )

    def token(self) -> str:
        if self.fixed_token is not None:
            return self.fixed_token
        access = get_access_token()
        if access is None:  # the HTTP app refuses such a request before any tool runs
            raise ToolError("this request carries no API token")
        return access.token

    async def me(self) -> dict[str, Any]:
        access = None if self.fixed_token is not None else get_access_token()
        if access is not None and access.claims and "me" in access.claims:
            return cast(dict[str, Any], access.claims["me"])
        async with self.api() as client:
            return cast(dict[str, Any], await client.run(_core.request(_core.Call("GET", "/me/"))))

    async def list_tools(self) -> list[MCPTool]:
        """Only the tools this caller's token may use (the API refuses the others anyway)."""
        me = await self.me()
        return [t for t in await super().list_tools() if may_use(me, TOOLS[t.name].need)]

    @asynccontextmanager
    async def api(self) -> AsyncIterator[AsyncClient]:
        """A client with the caller's token; the API's refusals become tool errors that carry
        its message (``Forbidden: 403: This API token's scopes do not include vms.exec_vm.``)."""
        try:
            if self.fixed_token is None:  # HTTP: a client for this request's token
                async with AsyncClient(self.url, self.token()) as client:
                    yield client
            else:  # stdio: one client, kept open (and its connection) for the process's life
                if self._client is None:
                    self._client = AsyncClient(self.url, self.fixed_token)
                yield self._client
        except SandboxError as exc:
            raise ToolError(f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc


def _server(ctx: Context) -> SandboxMCP:
    return cast(SandboxMCP, ctx.mcp_server)


# --- Results ------------------------------------------------------------------------------------


class SandboxInfo(BaseModel):
    """A sandbox as the API shows it (the fields a model needs)."""

    model_config = ConfigDict(extra="ignore")
    id: str
    name: str
    state: str
    owner: str | None = None
    template: str | None = None
    vcpus: int | None = None
    memory_mib: int | None = None
    disk_mib: int | None = None
    ip: str | None = None
    hostname: str | None = None
    last_error: str | None = None
    created_at: str | None = None


class SandboxList(BaseModel):
    sandboxes: list[SandboxInfo]
    count: int


class TemplateInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    description: str = ""
    vcpus: int | None = None
    memory_mib: int | None = None
    disk_mib: int | None = None


class TemplateList(BaseModel):
    templates: list[TemplateInfo]


class SnapshotInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    name: str
    state: str
    vm: str | None = None
    vm_name: str | None = None
    size_bytes: int | None = None
    created_at: str | None = None


class ExecOutput(BaseModel):
    exit_code: int | None = Field(description="the command's exit code (null: a signal ended it)")
    signal: int | None = None
    timed_out: bool
    duration_s: float
    stdout: str = Field(description="the output's first bytes as text (invalid UTF-8 replaced)")
    stderr: str
    stdout_truncated: bool = Field(description="true: stdout holds only the first bytes")
    stderr_truncated: bool
    stdout_size: int = Field(description="bytes the command wrote to stdout in all")
    stderr_size: int


class FileRead(BaseModel):
    path: str
    size: int
    sha256: str
    encoding: Literal["utf-8", "base64"] = Field(
        description="utf-8: content is the text; base64: the bytes were not UTF-8 text"
    )
    content: str


class FileWritten(BaseModel):
    path: str
    size: int
    sha256: str


# --- Parameters ---------------------------------------------------------------------------------

SandboxRef = Annotated[
    str,
    Field(
        min_length=1,
        max_length=100,
        description="the sandbox's id, or its exact name (list_sandboxes shows both)",
    ),
]
GuestPath = Annotated[
    str, Field(min_length=2, max_length=4096, description="an absolute path in the guest")
]
WaitS = Annotated[
    float, Field(gt=0, le=1800, description="seconds to wait for the outcome (default 300)")
]


async def _vm_id(client: AsyncClient, ref: str) -> str:
    """An id is used as it is (the API answers 404 for one the caller cannot see), a name is
    looked up: one API call saved for the caller that names sandboxes by id."""
    if _core.UUID.match(ref):
        return ref
    return str((await client.run(_core.find_vm(ref)))["id"])


def _clip(data: bytes, limit: int) -> tuple[str, bool]:
    return data[:limit].decode(errors="replace"), len(data) > limit


# --- Tools --------------------------------------------------------------------------------------


@tool("list_templates", Need(frozenset(), write=False), read_only=True, idempotent=True)
async def list_templates(ctx: Context) -> TemplateList:
    """The templates a sandbox can be made from (name, size, what it is)."""
    async with _server(ctx).api() as client:
        rows = await client.run(_core.list_all("/templates/"))
    return TemplateList(templates=[TemplateInfo.model_validate(r) for r in rows])


@tool("list_sandboxes", Need(VM_READ, write=False), read_only=True, idempotent=True)
async def list_sandboxes(
    ctx: Context,
    state: Annotated[
        str | None,
        Field(max_length=32, description="only sandboxes in this state (running, stopped, ...)"),
    ] = None,
) -> SandboxList:
    """The sandboxes you can see (your own; everyone's for a viewer or an admin), at most 500,
    destroyed ones left out."""
    async with _server(ctx).api() as client:
        rows = await client.run(_core.list_all("/vms/", {"state": state} if state else None, 500))
    return SandboxList(sandboxes=[SandboxInfo.model_validate(r) for r in rows], count=len(rows))


@tool("create_sandbox", Need(frozenset({"vms.add_virtualmachine"}), write=True), read_only=False)
async def create_sandbox(
    ctx: Context,
    template: Annotated[
        str,
        Field(min_length=1, max_length=100, description="a template name (list_templates)"),
    ] = "linux-default",
    name: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=63,
            description="a name for it (letters, digits, dashes); one is made up when left out",
        ),
    ] = None,
    vcpus: Annotated[int | None, Field(ge=1, le=64, description="default: the template's")] = None,
    memory_mib: Annotated[
        int | None, Field(ge=64, le=1 << 20, description="default: the template's")
    ] = None,
    lifetime_s: Annotated[
        int | None,
        Field(
            ge=0,
            description="seconds until the server stops or destroys it (0: never; default: "
            "its template's lifetime)",
        ),
    ] = None,
    timeout_s: WaitS = CREATE_TIMEOUT_S,
) -> SandboxInfo:
    """Create a sandbox and wait until it runs (at most timeout_s seconds)."""
    async with _server(ctx).api() as client:
        vm = await client.run(
            _core.create_vm(
                name=name,
                template=template,
                vcpus=vcpus,
                memory_mib=memory_mib,
                lifetime_s=lifetime_s,
                timeout=timeout_s,
            )
        )
    return SandboxInfo.model_validate(vm)


@tool("exec", Need(frozenset({"vms.exec_vm"}), write=True), read_only=False)
async def exec_command(
    ctx: Context,
    sandbox: SandboxRef,
    command: Annotated[
        str | list[str],
        Field(
            description=(
                "a shell command line (run with sh -c, so pipes and && work), or a list of "
                "arguments run as they are (no shell)"
            )
        ),
    ],
    stdin: Annotated[str | None, Field(description="text fed to its standard input")] = None,
    env: Annotated[dict[str, str] | None, Field(description="environment variables to set")] = None,
    cwd: Annotated[
        str | None, Field(min_length=1, max_length=4096, description="the working directory")
    ] = None,
    timeout_s: Annotated[
        float, Field(gt=0, le=600, description="seconds it may run before it is killed")
    ] = 60.0,
) -> ExecOutput:
    """Run a command in a sandbox and return its exit code and output. Each of stdout and stderr
    is cut to the server's limit (its first bytes; *_truncated says so, *_size gives the full
    size): pipe through tail, head or grep for the part you need."""
    server = _server(ctx)
    if isinstance(command, list) and not command:
        raise ToolError("command: give a command line or at least one argument")
    if isinstance(command, str) and not command.strip():
        raise ToolError("command: empty")
    if stdin is not None and len(stdin.encode()) > server.limits.max_file:
        raise ToolError(f"stdin: more than the {server.limits.max_file} bytes allowed")
    body = _core.exec_body(command, stdin, env, cwd, timeout_s)
    async with server.api() as client:
        vm_id = await _vm_id(client, sandbox)
        ran = await client.run(_core.run_exec(vm_id, body))
    limit = server.limits.max_output
    stdout, out_cut = _clip(ran.stdout_bytes, limit)
    stderr, err_cut = _clip(ran.stderr_bytes, limit)
    return ExecOutput(
        exit_code=ran.exit_code,
        signal=ran.signal,
        timed_out=ran.timed_out,
        duration_s=ran.duration_s,
        stdout=stdout,
        stderr=stderr,
        stdout_truncated=out_cut or ran.stdout_size > len(ran.stdout_bytes),
        stderr_truncated=err_cut or ran.stderr_size > len(ran.stderr_bytes),
        stdout_size=max(ran.stdout_size, len(ran.stdout_bytes)),
        stderr_size=max(ran.stderr_size, len(ran.stderr_bytes)),
    )


@tool("read_file", Need(frozenset({"vms.read_files"}), write=False), read_only=True)
async def read_file(ctx: Context, sandbox: SandboxRef, path: GuestPath) -> FileRead:
    """Read a file from a sandbox (at most the server's file limit; for a larger one, read a
    part with exec: head -c, tail -c). Text comes back as it is, other bytes as base64."""
    server = _server(ctx)
    async with server.api() as client:
        vm_id = await _vm_id(client, sandbox)
        data = await client.run(_core.download(vm_id, path, None, server.limits.max_file))
    try:
        text, encoding = data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(data).decode(), "base64"
    return FileRead(
        path=path,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        encoding=cast(Literal["utf-8", "base64"], encoding),
        content=text,
    )


@tool("write_file", Need(frozenset({"vms.write_files"}), write=True), read_only=False)
async def write_file(
    ctx: Context,
    sandbox: SandboxRef,
    path: GuestPath,
    content: Annotated[str, Field(description="the file's text, or its bytes in base64")],
    encoding: Annotated[
        Literal["utf-8", "base64"], Field(description="how content is given")
    ] = "utf-8",
) -> FileWritten:
    """Write a file in a sandbox (created or replaced; its directories are made), at most the
    server's file limit."""
    server = _server(ctx)
    if encoding == "base64":
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ToolError("content: not valid base64") from exc
    else:
        data = content.encode()
    if len(data) > server.limits.max_file:
        raise ToolError(
            f"content: {len(data)} bytes, more than the {server.limits.max_file} allowed"
        )
    digest = hashlib.sha256(data).hexdigest()
    async with server.api() as client:
        vm_id = await _vm_id(client, sandbox)
        stored = await client.run(_core.upload(vm_id, path, data, digest))
    return FileWritten(path=str(stored["path"]), size=int(stored["size"]), sha256=digest)


@tool(
    "snapshot_sandbox",
    Need(frozenset({"vms.snapshot_vm"}), write=True),
    read_only=False,
)
async def snapshot_sandbox(
    ctx: Context,
    sandbox: SandboxRef,
    name: Annotated[
        str | None, Field(min_length=1, max_length=63, description="a name for the snapshot")
    ] = None,
    timeout_s: WaitS = CREATE_TIMEOUT_S,
) -> SnapshotInfo:
    """Snapshot a running or paused sandbox (memory and disk) and wait until it is ready."""
    async with _server(ctx).api() as client:
        vm_id = await _vm_id(client, sandbox)
        body = {"name": name} if name else {}
        answer = await client.run(_core.vm_action(vm_id, "snapshot", body, True, timeout_s))
        snap = await client.run(_core.get_snapshot(str(answer["snapshot"]["id"])))
    return SnapshotInfo.model_validate(snap)


@tool("start_sandbox", Need(frozenset({"vms.operate_vm"}), write=True), read_only=False)
async def start_sandbox(
    ctx: Context, sandbox: SandboxRef, timeout_s: WaitS = CREATE_TIMEOUT_S
) -> SandboxInfo:
    """Start a stopped sandbox and wait until it runs."""
    async with _server(ctx).api() as client:
        vm_id = await _vm_id(client, sandbox)
        answer = await client.run(_core.vm_action(vm_id, "start", None, True, timeout_s))
    return SandboxInfo.model_validate(answer["vm"])


@tool("stop_sandbox", Need(frozenset({"vms.operate_vm"}), write=True), read_only=False)
async def stop_sandbox(
    ctx: Context,
    sandbox: SandboxRef,
    force: Annotated[
        bool, Field(description="stop it at once instead of asking the guest to shut down")
    ] = False,
    timeout_s: WaitS = CREATE_TIMEOUT_S,
) -> SandboxInfo:
    """Stop a sandbox (its disk is kept; start_sandbox starts it again)."""
    async with _server(ctx).api() as client:
        vm_id = await _vm_id(client, sandbox)
        body = {"force": force}
        answer = await client.run(_core.vm_action(vm_id, "stop", body, True, timeout_s))
    return SandboxInfo.model_validate(answer["vm"])


@tool(
    "destroy_sandbox",
    Need(frozenset({"vms.delete_virtualmachine"}), write=True),
    read_only=False,
    destructive=True,
    idempotent=True,
)
async def destroy_sandbox(
    ctx: Context, sandbox: SandboxRef, timeout_s: WaitS = CREATE_TIMEOUT_S
) -> SandboxInfo:
    """Destroy a sandbox, whatever its state: its disk and memory are gone (its snapshots are
    kept)."""
    async with _server(ctx).api() as client:
        vm_id = await _vm_id(client, sandbox)
        answer = await client.run(_core.destroy_vm(vm_id, True, timeout_s))
    return SandboxInfo.model_validate(answer["vm"])
