"""API latency and throughput under 50 concurrent clients, against the real server on PostgreSQL.

    python bench/api.py [--clients 50] [--rate 320] [--seconds 15] [--create-share 0.1]

Creates a throwaway PostgreSQL database (DATABASE_URL's server, else the local one), migrates
it, seeds an operator with a token and 200 VMs, starts the server the way `make run` does
(`manage.py serve`: web and worker), waits until its processes are done starting, and drives it
with --clients keep-alive connections that together send --rate requests per second (open loop:
each request has a scheduled send time and its latency counts from then, so a server that falls
behind shows it). The mix: 60 % list (`GET /api/v1/vms/?limit=20`), 30 % retrieve, 10 % command
acceptance (`POST /api/v1/vms/`, a new VM defined and stopped: the command path, with its event,
without booting a guest). The last line is one JSON object: clients, requests, rps, p50_ms,
p99_ms, errors, and p50/p99 per kind; stderr has a per-second timeline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after ROOT: bench/audit.py must not shadow audit/

from event_store import throwaway_database  # noqa: E402


def ensure_redis(url: str) -> None:
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    try:
        socket.create_connection((host, port), timeout=1).close()
        return
    except OSError:
        pass
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        check=True,
    )
    time.sleep(0.5)


def session_cpu_s(sid: int) -> float:
    """CPU seconds used so far by the processes of session ``sid`` (the server and its children)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6, session id (after pid and comm)
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def wait_quiet(sid: int, timeout: float = 60.0) -> None:
    """Until the server's processes (web and worker cluster) are done starting: the worker
    cluster forks and imports for several seconds after the web port opens."""
    deadline = time.monotonic() + timeout
    quiet = 0
    last = session_cpu_s(sid)
    while quiet < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
        now = session_cpu_s(sid)
        quiet = quiet + 1 if now - last < 0.1 else 0
        last = now


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Connection:
    """A minimal HTTP/1.1 keep-alive client: the client must cost far less than the server."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {self.token}\r\n"
            f"Accept: application/json\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        assert self.reader is not None
        self.writer.write(head.encode() + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length, chunked, close = 0, False, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            name = name.lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value:
                chunked = True
            elif name == "connection" and "close" in value.lower():
                close = True
        if chunked:
            while True:
                size = int((await self.reader.readline()).strip(), 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            await self.reader.readexactly(length)
        if close:
            self.writer.close()
            self.writer = None
        return status


async def drive(
    port: int,
    token: str,
    vm_ids: list[str],
    clients: int,
    rate: float,
    seconds: float,
    warmup: float,
    create_share: float = 0.1,
):
    latencies: list[float] = []
    timeline: dict[int, list[float]] = {}  # second of the run (by send time) -> latencies
    by_kind: dict[str, list[float]] = {"list": [], "retrieve": [], "create": []}
    errors = 0
    statuses: dict[int, int] = {}
    last_done = [0.0]
    counter = 0
    start = time.perf_counter() + 0.5
    interval = clients / rate  # each client's period
    # 60 % list, 30 % retrieve, 10 % create by default: reads split 2:1 whatever the writes.
    list_to = (1 - create_share) * 2 / 3
    retrieve_to = 1 - create_share

    async def client(i: int) -> None:
        nonlocal errors, counter
        conn = Connection(port, token)
        rng = random.Random(i)
        k = 0
        while True:
            due = start + (i / clients) * interval + k * interval
            k += 1
            if due > start + warmup + seconds:
                return
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            roll = rng.random()
            kind = "list" if roll < list_to else "retrieve" if roll < retrieve_to else "create"
            try:
                if kind == "list":
                    status = await conn.request("GET", "/api/v1/vms/?limit=20")
                elif kind == "retrieve":
                    status = await conn.request("GET", f"/api/v1/vms/{rng.choice(vm_ids)}/")
                else:
                    counter += 1
                    body = json.dumps(
                        {"name": f"b{i}-{counter}", "template": "linux-small", "start": False}
                    )
                    status = await conn.request("POST", "/api/v1/vms/", body.encode())
            except (OSError, ValueError, asyncio.IncompleteReadError):
                status = 0
                conn = Connection(port, token)
            elapsed = time.perf_counter() - due  # open loop: from the scheduled send time
            if due >= start + warmup:
                last_done[0] = max(last_done[0], time.perf_counter())
                statuses[status] = statuses.get(status, 0) + 1
                latencies.append(elapsed)
                by_kind[kind].append(elapsed)
                timeline.setdefault(int(due - start), []).append(elapsed)
                if status >= 400 or status == 0:
                    errors += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    print("statuses", statuses, file=sys.stderr)
    for second, values in sorted(timeline.items()):  # where a slow run went wrong
        values.sort()
        print(
            f"t={second:3d}s n={len(values):4d} p50={values[len(values) // 2] * 1000:8.1f} ms "
            f"max={values[-1] * 1000:8.1f} ms",
            file=sys.stderr,
        )
    # Completed requests over the time they really took: a server that falls behind finishes
    # the measured window late, and its throughput shows it.
    elapsed = max(seconds, last_done[0] - (start + warmup))
    return latencies, errors, elapsed, by_kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument(
        "--rate", type=float, default=320.0, help="requests per second, all clients"
    )
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument(
        "--create-share", type=float, default=0.1, help="share of requests that create a VM"
    )
    args = parser.parse_args()

    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/9")
    ensure_redis(redis_url)
    data_dir = ROOT / "var" / f"bench-api-{os.getpid()}"
    try:
        with throwaway_database("sandbox_bench_api") as url:
            env = dict(os.environ)
            env.update(
                DATABASE_URL=url,
                REDIS_URL=redis_url,
                SANDBOX_DATA_DIR=str(data_dir),
                SANDBOX_LOG_LEVEL="WARNING",
                SANDBOX_MAX_VMS="1000000",
                DJANGO_SETTINGS_MODULE="sandbox_site.settings",
            )
            os.environ.update(env)
            latencies, errors, elapsed, by_kind = serve_and_drive(args, env)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    latencies.sort()
    result = {
        "clients": args.clients,
        "target_rps": args.rate,
        "requests": len(latencies),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p95_ms": round(latencies[int(len(latencies) * 0.95) - 1] * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
        "max_ms": round(latencies[-1] * 1000, 2),
        "errors": errors,
        "mix": f"{(1 - args.create_share) * 200 / 3:.0f}% list, "
        f"{(1 - args.create_share) * 100 / 3:.0f}% retrieve, {args.create_share * 100:.0f}% create",
    }
    for kind, values in by_kind.items():
        values.sort()
        if values:
            result[f"{kind}_p50_ms"] = round(statistics.median(values) * 1000, 2)
            result[f"{kind}_p99_ms"] = round(values[int(len(values) * 0.99) - 1] * 1000, 2)
    print(json.dumps(result))


def serve_and_drive(
    args: argparse.Namespace, env: dict[str, str]
) -> tuple[list[float], int, float, dict[str, list[float]]]:
    """Migrate and seed the database, start `manage.py serve` on it, drive it, stop it."""
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connections

    call_command("migrate", verbosity=0)
    token, vm_ids = seed()
    connections.close_all()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=open(os.environ.get("BENCH_SERVER_LOG", os.devnull), "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.2)
        wait_quiet(server.pid)
        return asyncio.run(
            drive(
                port,
                token,
                vm_ids,
                args.clients,
                args.rate,
                args.seconds,
                args.warmup,
                args.create_share,
            )
        )
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def seed() -> tuple[str, list[str]]:
    from accounts import commands as accounts
    from accounts.caller import Caller
    from audit.actor import Actor
    from vms import commands
    from vms.models import Quota

    user = accounts.create_user(Actor.system(), username="bench", password=None, role="operator")
    Quota.objects.create(
        user=user, max_vms=100000, max_vcpus=1000000, max_memory_mib=10**9, max_disk_mib=10**9
    )
    caller = Caller.for_user(user, channel="shell")
    vm_ids = [
        str(
            commands.create(caller, name=f"seed-{i}", template="linux-small", start_now=False).vm.pk
        )
        for i in range(200)
    ]
    token = accounts.create_token(Actor.system(), user, name="bench").plaintext
    return token, vm_ids


if __name__ == "__main__":
    main()
