"""MicroVM Sandbox SDK: sandboxes over the product's public REST API and websockets.

from sandbox_sdk import Sandbox
with Sandbox.create(template="linux-small") as sb:
    print(sb.exec(["uname", "-a"]).stdout)
"""

from sandbox_sdk._base import Snapshot
from sandbox_sdk._core import Chunk, ExecResult, ExecStatus
from sandbox_sdk.aio import AsyncClient, AsyncConsole, AsyncExecStream, AsyncSandbox
from sandbox_sdk.errors import (
    AuthError,
    BadRequest,
    ChecksumMismatch,
    Conflict,
    Forbidden,
    GuestError,
    NotFound,
    QuotaExceeded,
    RequestFailed,
    SandboxError,
    TooLarge,
    Unavailable,
    WaitTimeout,
)
from sandbox_sdk.sync import Client, Console, ExecStream, Sandbox

__all__ = [
    "AsyncClient",
    "AsyncConsole",
    "AsyncExecStream",
    "AsyncSandbox",
    "AuthError",
    "BadRequest",
    "ChecksumMismatch",
    "Chunk",
    "Client",
    "Conflict",
    "Console",
    "ExecResult",
    "ExecStatus",
    "ExecStream",
    "Forbidden",
    "GuestError",
    "NotFound",
    "QuotaExceeded",
    "RequestFailed",
    "Sandbox",
    "SandboxError",
    "Snapshot",
    "TooLarge",
    "Unavailable",
    "WaitTimeout",
]
