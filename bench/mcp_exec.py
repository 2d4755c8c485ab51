"""What the MCP server adds to an exec: the ``exec`` tool over stdio and over streamable HTTP
against the SDK's own exec, on the same guest.

    python bench/mcp_exec.py [--samples 120] [--blocks 4]

Starts everything it needs in a temporary directory (an embedded SQLite database, ``manage.py
worker``, ``manage.py serve --no-worker`` on 127.0.0.1, ``sandbox mcp --transport
streamable-http``), creates a linux-small guest through the SDK, then runs ``true`` in it
(named by its id), alternating blocks of three clients so that host noise hits them alike: the
async SDK (``AsyncSandbox.exec``, the baseline: one POST), the ``exec`` tool through ``sandbox
mcp`` over stdio (JSON-RPC over a pipe, then the tool's GET of the VM and its POST), and the
same tool over streamable HTTP (each request's token also checked with ``GET /api/v1/me/``).
The VM is destroyed and everything stopped at the end. The last line is one JSON object with
the p50s, ``mcp_stdio_added_ms`` / ``mcp_http_added_ms`` (p50 minus the SDK's) and
``mcp_stdio_overhead_pct`` / ``mcp_http_overhead_pct``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# (Not named mcp.py: the script's own directory comes first on sys.path, and `import mcp`
# would find the script instead of the MCP package.)

from bench.sdk import free_port, pct, wait_ready  # noqa: E402


async def timed(call: Callable[[], Awaitable[None]], n: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        await call()
    out: list[float] = []
    for _ in range(n):
        began = time.perf_counter()
        await call()
        out.append((time.perf_counter() - began) * 1000)
    return out


def wait_listening(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
            return
        time.sleep(0.2)
    raise SystemExit(f"sandbox mcp did not listen on {port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=120, help="per client")
    parser.add_argument("--blocks", type=int, default=4, help="alternations of the clients")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sbx-bench-mcp-"))
    run = Path(f"/tmp/sbxbm-{os.getpid()}")
    run.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(
        DJANGO_SETTINGS_MODULE="sandbox_site.settings",
        SANDBOX_DATA_DIR=str(tmp / "data"),
        SANDBOX_SQLITE_PATH=str(tmp / "bench.sqlite3"),
        SANDBOX_RUNTIME_DIR=str(run),
        SANDBOX_VM_DATA_DIR=str(tmp / "vms"),
        SANDBOX_SNAPSHOT_DIR=str(tmp / "snapshots"),
        SANDBOX_HYPERVISOR="qemu",
        SANDBOX_WORKERS="1",
        SANDBOX_NETWORKING="off",  # exec needs no NIC; no namespace on this machine
        SANDBOX_LOG_LEVEL="WARNING",
        DJANGO_SECRET_KEY="bench-mcp-" + os.urandom(8).hex(),
        XDG_CONFIG_HOME=str(tmp / "config"),  # no login file of the user's
    )
    os.environ.clear()
    os.environ.update(env)
    import django

    django.setup()
    import httpx2
    from django.core.management import call_command
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client
    from mcp.client.streamable_http import streamable_http_client
    from sandbox_sdk import AsyncClient, AsyncSandbox, Client, Sandbox

    from accounts import commands as accounts
    from audit.actor import Actor
    from vms import images

    images.ensure_built()
    call_command("migrate", verbosity=0)
    procs: list[subprocess.Popen[bytes]] = []
    entry = Path(sys.executable).parent / "sandbox"
    try:
        actor = Actor.system(channel="shell", name="bench")
        user = accounts.create_user(actor, username="bench", password=None, role="operator")
        token = accounts.create_token(actor, user, name="bench").plaintext
        log = (tmp / "processes.log").open("ab")
        port, mcp_port = free_port(), free_port()
        url = f"http://127.0.0.1:{port}"
        for argv in (
            [sys.executable, str(ROOT / "manage.py"), "worker"],
            [sys.executable, str(ROOT / "manage.py"), "serve", "--no-worker"]
            + ["--host", "127.0.0.1", "--port", str(port), "--web-workers", "1"],
            [str(entry), "--url", url, "mcp", "--transport", "streamable-http"]
            + ["--port", str(mcp_port)],
        ):
            procs.append(
                subprocess.Popen(
                    argv, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True
                )
            )
        wait_ready(url, 60)
        wait_listening(mcp_port, 60)

        sdk = Client(url, token)
        sb = Sandbox.create(template="linux-small", name="bench-mcp", client=sdk, keep=True)
        stdio = StdioServerParameters(
            command=str(entry),
            args=["mcp"],
            env={**env, "SANDBOX_URL": url, "SANDBOX_TOKEN": token},
        )

        errlog = (tmp / "mcp-stdio.log").open("a")

        async def measure() -> dict[str, list[float]]:
            headers = {"Authorization": f"Bearer {token}"}
            async with (
                AsyncClient(url, token) as aclient,
                stdio_client(stdio, errlog=errlog) as (sr, sw),
                ClientSession(sr, sw) as over_stdio,
                httpx2.AsyncClient(headers=headers, timeout=60) as http,
                streamable_http_client(f"http://127.0.0.1:{mcp_port}/mcp", http_client=http) as (
                    hr,
                    hw,
                ),
                ClientSession(hr, hw) as over_http,
            ):
                await over_stdio.initialize()
                await over_http.initialize()
                asb = await AsyncSandbox.connect(sb.id, client=aclient)

                async def by_sdk() -> None:
                    assert (await asb.exec(["true"])).exit_code == 0

                def by_tool(session: ClientSession) -> Callable[[], Awaitable[None]]:
                    async def call() -> None:
                        done = await session.call_tool(
                            "exec", {"sandbox": sb.id, "command": ["true"]}
                        )
                        assert not done.is_error and done.structured_content is not None
                        assert done.structured_content["exit_code"] == 0

                    return call

                times: dict[str, list[float]] = {"sdk": [], "stdio": [], "http": []}
                per_block = max(1, args.samples // args.blocks)
                for _ in range(args.blocks):
                    times["sdk"] += await timed(by_sdk, per_block)
                    times["stdio"] += await timed(by_tool(over_stdio), per_block)
                    times["http"] += await timed(by_tool(over_http), per_block)
                return times

        times = asyncio.run(measure())
        sb.destroy()
        sdk.close()

        base = pct(times["sdk"], 0.5)
        result: dict[str, object] = {"bench": "mcp", "samples_per_client": len(times["sdk"])}
        for name in ("sdk", "stdio", "http"):
            key = "sdk_exec" if name == "sdk" else f"mcp_{name}_exec"
            result[f"{key}_p50_ms"] = round(pct(times[name], 0.5), 3)
            result[f"{key}_p95_ms"] = round(pct(times[name], 0.95), 3)
            result[f"{key}_mean_ms"] = round(statistics.fmean(times[name]), 3)
        for name in ("stdio", "http"):
            p50 = pct(times[name], 0.5)
            result[f"mcp_{name}_added_ms"] = round(p50 - base, 3)
            result[f"mcp_{name}_overhead_pct"] = round((p50 / base - 1) * 100, 2)
        print(json.dumps(result))
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        from vms.hypervisors import reconcile as scanner

        leftovers = list(scanner.scan(run, known_ids=[]).orphans)
        scanner.teardown_orphans(leftovers)
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
