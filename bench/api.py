"""API latency and throughput under 50 concurrent clients, against the real server on PostgreSQL.

    python bench/api.py [--clients 50] [--rate 320] [--seconds 15] [--create-share 0.1]
                        [--web-workers N] [--no-capacity] [--step-seconds 5]

Creates a throwaway PostgreSQL database (DATABASE_URL's server, else the local one), migrates
it, seeds an operator with a token and 200 VMs, starts the server the way `make run` does
(`manage.py serve`: web and worker), waits until its processes are done starting, and drives it
with --clients keep-alive connections that together send --rate requests per second (open loop:
each request has a scheduled send time and its latency counts from then, so a server that falls
behind shows it). The mix: 60 % list (`GET /api/v1/vms/?limit=20`), 30 % retrieve, 10 % command
acceptance (`POST /api/v1/vms/`, a new VM defined and stopped: the command path, with its event,
without booting a guest). The last line is one JSON object: clients, requests, rps, p50_ms,
p99_ms, errors, and p50/p99 per kind; stderr has a per-second timeline.

Capacity, against a bare baseline measured in the same run (before the fixed-rate run): a
minimal ASGI app (bench/bare_api.py: no Django, psycopg) on the same number of uvicorn
processes, answering the same list and retrieve SQL (captured from the product here) behind the
same token lookup and check. Both servers run side by side and are driven with reads only (2/3
list, 1/3 retrieve) at rates stepped up by --step-factor from --start-rate, each step measured on
each server in turn: ``capacity_rps`` is, per server, the highest offered rate at which p99 stays
under --p99-limit-ms (50) without errors (a failing step is measured again once, against noise;
then two bisection steps narrow it), and ``api_vs_bare_ratio`` is the product's over the bare
app's: a ratio that means the same on a faster or slower machine.
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
import uuid
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
    quiet: bool = False,
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
    if not quiet:
        print("statuses", statuses, file=sys.stderr)
    for second, values in sorted(timeline.items()) if not quiet else ():  # where it went wrong
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
    parser.add_argument(
        "--web-workers",
        type=int,
        default=min(8, 2 * (os.cpu_count() or 1)),  # `serve`'s own default with Redis
        help="web processes, for the product and the bare app alike",
    )
    parser.add_argument("--no-capacity", action="store_true", help="skip the capacity search")
    parser.add_argument("--p99-limit-ms", type=float, default=50.0)
    parser.add_argument("--start-rate", type=float, default=25.0)
    parser.add_argument("--step-factor", type=float, default=1.3)
    parser.add_argument("--max-rate", type=float, default=4000.0)
    parser.add_argument("--step-seconds", type=float, default=5.0, help="measured, per step")
    parser.add_argument("--step-warmup", type=float, default=2.0)
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
                # The API's speed needs no NIC; its worker must not set up the product's
                # namespace and host link on this machine (bench/network.py measures NICs).
                SANDBOX_NETWORKING="off",
                DJANGO_SETTINGS_MODULE="sandbox_site.settings",
            )
            os.environ.update(env)
            latencies, errors, elapsed, by_kind, capacity = serve_and_drive(args, env, url)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    latencies.sort()
    result = {
        "clients": args.clients,
        "web_workers": args.web_workers,
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
    result.update(capacity)
    print(json.dumps(result))


def start_server(argv: list[str], env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    """Start a server in its own session and wait until it listens and is done starting."""
    server = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdout=open(os.environ.get("BENCH_SERVER_LOG", os.devnull), "a"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                stop_server(server)
                raise SystemExit(f"the server did not start: {argv}") from None
            time.sleep(0.2)
    wait_quiet(server.pid)
    return server


def stop_server(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


def serve_and_drive(
    args: argparse.Namespace, env: dict[str, str], url: str
) -> tuple[list[float], int, float, dict[str, list[float]], dict[str, object]]:
    """Migrate and seed the database, start `manage.py serve` on it (and the bare app beside
    it), search both capacities, drive the product at the fixed rate, stop them."""
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connections

    call_command("migrate", verbosity=0)
    token, vm_ids = seed()
    config = capture_product_sql(token, vm_ids[0], url) if not args.no_capacity else None
    connections.close_all()
    workers = ["--web-workers", str(args.web_workers)]
    port = free_port()
    server = start_server(
        [sys.executable, str(ROOT / "manage.py"), "serve", "--port", str(port), *workers],
        env,
        port,
    )
    try:
        capacity: dict[str, object] = {}
        if config is not None:
            capacity = bare_and_capacity(args, env, config, token, vm_ids, port)
        latencies, errors, elapsed, by_kind = asyncio.run(
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
        return latencies, errors, elapsed, by_kind, capacity
    finally:
        stop_server(server)


# --- the bare baseline and the capacity search ------------------------------------------------


def capture_product_sql(token: str, vm_id: str, url: str) -> dict[str, object]:
    """The SQL the product runs for a list and a retrieve (steady state: each request is made
    twice and the second one's statements kept), with the parameters it bound, for the bare app.

    The token lookup is the statement bound to the token's key; the others are the request's.
    Parameters equal to the user's id or the VM's id are marked as the request's to fill in.
    """
    from django.conf import settings
    from django.db import connection
    from django.db.backends import utils
    from django.test import Client

    from accounts.models import APIToken
    from sandbox_site.lanes import lane_threads

    key = token.split("_")[1]
    api_token = APIToken.objects.select_related("user").get(key=key)
    user_id, vm_uuid = api_token.user_id, uuid.UUID(vm_id)
    captured: list[tuple[str, list[object]]] = []
    originals = {cls: cls.execute for cls in (utils.CursorWrapper, utils.CursorDebugWrapper)}

    def recording(original):  # noqa: ANN001, ANN202 - wraps Django's own signature
        def execute(self, sql, params=None):  # noqa: ANN001, ANN202
            captured.append((sql, list(params or [])))
            return original(self, sql, params)

        return execute

    client = Client()
    statements: dict[str, list[tuple[str, list[object]]]] = {}
    try:
        for cls, original in originals.items():
            cls.execute = recording(original)
        for kind, path in (
            ("list", "/api/v1/vms/?limit=20"),
            ("retrieve", f"/api/v1/vms/{vm_id}/"),
        ):
            for _ in range(2):
                captured.clear()
                response = client.get(
                    path,
                    HTTP_AUTHORIZATION=f"Bearer {token}",
                    HTTP_ACCEPT="application/json",
                    HTTP_HOST="127.0.0.1",
                )
                if response.status_code != 200:
                    raise SystemExit(
                        f"capturing {path}: the product answered {response.status_code}"
                    )
            statements[kind] = list(captured)
    finally:
        for cls, original in originals.items():
            cls.execute = original

    def encode(value: object) -> object:
        if isinstance(value, uuid.UUID):
            return {"uuid": str(value)}
        if value is None or isinstance(value, str | int | float | bool):
            return value
        raise SystemExit(f"the bare app cannot bind a {type(value).__name__} parameter")

    def statement(sql: str, params: list[object]) -> dict[str, object]:
        return {
            "sql": sql,
            "params": [encode(p) for p in params],
            "user_slots": [i for i, p in enumerate(params) if type(p) is int and p == user_id],
            "vm_slots": [
                i for i, p in enumerate(params) if p in (vm_uuid, str(vm_uuid), vm_uuid.hex)
            ],
        }

    token_sql = None
    requests: dict[str, list[dict[str, object]]] = {}
    for kind, executed in statements.items():
        lookups = [sql for sql, params in executed if params == [key]]
        if len(lookups) != 1:
            raise SystemExit(f"expected one token lookup in the product's {kind}: {executed}")
        token_sql = lookups[0]
        requests[kind] = [statement(sql, p) for sql, p in executed if p != [key]]
    qn = connection.ops.quote_name
    meta = APIToken._meta
    options = settings.DATABASES["default"].get("OPTIONS", {})
    return {
        "dsn": url,
        "peppers": {str(k): v for k, v in settings.SANDBOX_TOKEN_PEPPERS.items()},
        "token_sql": token_sql,
        "last_used_sql": (
            f"UPDATE {qn(meta.db_table)} SET {qn(meta.get_field('last_used_at').column)} = %s, "  # noqa: S608
            f"{qn(meta.get_field('last_used_ip').column)} = %s WHERE {qn(meta.pk.column)} = %s"
        ),
        "list": requests["list"],
        "retrieve": requests["retrieve"],
        "pool_size": lane_threads()[0],  # a product web process's read lane
        "prepare_threshold": options.get("prepare_threshold", 5),
    }


def bare_and_capacity(
    args: argparse.Namespace,
    env: dict[str, str],
    config: dict[str, object],
    token: str,
    vm_ids: list[str],
    api_port: int,
) -> dict[str, object]:
    """Start the bare app beside the product and search both capacities."""
    config_path = ROOT / "var" / f"bench-bare-api-{os.getpid()}.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config))
    bare_port = free_port()
    bare_env = dict(env, BARE_API_CONFIG=str(config_path))
    bare = start_server(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bare_api:app",
            "--app-dir",
            str(ROOT / "bench"),
            "--host",
            "127.0.0.1",
            "--port",
            str(bare_port),
            "--workers",
            str(args.web_workers),
            "--no-access-log",
            "--lifespan",
            "on",
            "--log-level",
            "warning",
        ],  # fmt: skip
        bare_env,
        bare_port,
    )
    try:
        ports = {"api": api_port, "bare": bare_port}
        capacity, steps, capped = search_capacity(args, ports, token, vm_ids)
    finally:
        stop_server(bare)
        config_path.unlink(missing_ok=True)
    ratio = capacity["api"] / capacity["bare"] if capacity["bare"] else None
    return {
        "capacity_rps": capacity,
        "api_vs_bare_ratio": round(ratio, 3) if ratio is not None else None,
        "capacity_p99_limit_ms": args.p99_limit_ms,
        "capacity_mix": "67% list, 33% retrieve",
        # Servers that never went over the limit below --max-rate: their capacity is higher.
        "capacity_capped": capped,
        "capacity_steps": steps,
    }


def measure_step(
    args: argparse.Namespace, port: int, token: str, vm_ids: list[str], rate: float
) -> tuple[bool, float, int]:
    """One capacity step: (passed, p99 in ms, errors) at ``rate`` offered, reads only."""
    latencies, errors, _, _ = asyncio.run(
        drive(
            port,
            token,
            vm_ids,
            args.clients,
            rate,
            args.step_seconds,
            args.step_warmup,
            create_share=0.0,
            quiet=True,
        )
    )
    latencies.sort()
    p99_ms = latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000 if latencies else 1e9
    return p99_ms < args.p99_limit_ms and errors == 0, round(p99_ms, 1), errors


def search_capacity(
    args: argparse.Namespace, ports: dict[str, int], token: str, vm_ids: list[str]
) -> tuple[dict[str, float], dict[str, list[list[float]]], list[str]]:
    """Per server, the highest offered rate whose p99 stays under the limit (0 if none)."""
    passed: dict[str, float] = dict.fromkeys(ports, 0.0)
    failed: dict[str, float | None] = dict.fromkeys(ports)
    steps: dict[str, list[list[float]]] = {name: [] for name in ports}

    def step(name: str, rate: float) -> bool:
        for attempt in range(2):  # a failing step gets a second chance (other jobs' noise)
            ok, p99_ms, errors = measure_step(args, ports[name], token, vm_ids, rate)
            steps[name].append([round(rate, 1), p99_ms, errors])
            print(
                f"capacity {name:4s} {rate:7.1f}/s p99 {p99_ms:8.1f} ms errors {errors}"
                f"{'' if ok else ' (over)'}{' again' if attempt else ''}",
                file=sys.stderr,
            )
            if ok:
                return True
        return False

    rate = args.start_rate
    while rate <= args.max_rate and any(f is None for f in failed.values()):
        for name in ports:  # each server in turn at the same rate: both see the same noise
            if failed[name] is None:
                if step(name, rate):
                    passed[name] = rate
                else:
                    failed[name] = rate
        rate *= args.step_factor
    for name in ports:  # two bisection steps between the last pass and the first failure
        high = failed[name]
        for _ in range(2):
            if high is None or passed[name] == 0:
                break
            middle = (passed[name] + high) / 2
            if step(name, middle):
                passed[name] = middle
            else:
                high = middle
    capped = [name for name, rate in failed.items() if rate is None]
    return {name: round(value, 1) for name, value in passed.items()}, steps, capped


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
