"""What the SDK adds to an exec: ``Sandbox.exec`` against a bare httpx POST to the same endpoint.

    python bench/sdk.py [--samples 200] [--blocks 4]

Starts everything it needs in a temporary directory (an embedded SQLite database, ``manage.py
worker``, ``manage.py serve --no-worker`` on 127.0.0.1), creates a linux-small guest through
the SDK, then runs ``true`` in it, alternating blocks of the two clients so that host noise hits
both alike: the SDK (``sandbox_sdk.Sandbox.exec``: its request building, error mapping and
result parsing) and raw HTTP (one keep-alive ``httpx.Client`` posting the same JSON and reading
the JSON answer). Both go through the same server to the same guest. The VM is destroyed and
everything stopped at the end. The last line is one JSON object with ``sdk_exec_p50_ms``,
``raw_http_exec_p50_ms`` and ``sdk_overhead_pct`` (the aim: at most 10 %).
"""

from __future__ import annotations

import argparse
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
import urllib.request
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:  # noqa: S310
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server at {url} did not answer")


def timed(call: Any, n: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        call()
    out: list[float] = []
    for _ in range(n):
        began = time.perf_counter()
        call()
        out.append((time.perf_counter() - began) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="per client")
    parser.add_argument("--blocks", type=int, default=4, help="alternations of the two clients")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sbx-bench-sdk-"))
    run = Path(f"/tmp/sbxbs-{os.getpid()}")
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
        DJANGO_SECRET_KEY="bench-sdk-" + os.urandom(8).hex(),
    )
    os.environ.clear()
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command
    from sandbox_sdk import Client, Sandbox

    from accounts import commands as accounts
    from audit.actor import Actor
    from vms import images

    images.ensure_built()
    call_command("migrate", verbosity=0)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        actor = Actor.system(channel="shell", name="bench")
        user = accounts.create_user(actor, username="bench", password=None, role="operator")
        token = accounts.create_token(actor, user, name="bench").plaintext
        log = (tmp / "processes.log").open("ab")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        for argv in (
            [sys.executable, str(ROOT / "manage.py"), "worker"],
            [sys.executable, str(ROOT / "manage.py"), "serve", "--no-worker"]
            + ["--host", "127.0.0.1", "--port", str(port), "--web-workers", "1"],
        ):
            procs.append(
                subprocess.Popen(
                    argv, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True
                )
            )
        wait_ready(url, 60)

        sdk = Client(url, token)
        raw = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        body = {"argv": ["true"]}
        with Sandbox.create(template="linux-small", name="bench-sdk", client=sdk) as sb:
            path = f"/api/v1/vms/{sb.id}/exec/"

            def by_sdk() -> None:
                assert sb.exec(["true"]).exit_code == 0

            def by_raw() -> None:
                answer = raw.post(path, json=body)
                assert answer.status_code == 200 and answer.json()["exit_code"] == 0

            sdk_ms: list[float] = []
            raw_ms: list[float] = []
            per_block = max(1, args.samples // args.blocks)
            for _ in range(args.blocks):
                raw_ms += timed(by_raw, per_block)
                sdk_ms += timed(by_sdk, per_block)
        raw.close()
        sdk.close()

        sdk_p50, raw_p50 = pct(sdk_ms, 0.5), pct(raw_ms, 0.5)
        result = {
            "bench": "sdk",
            "samples_per_client": len(sdk_ms),
            "sdk_exec_p50_ms": round(sdk_p50, 3),
            "sdk_exec_p95_ms": round(pct(sdk_ms, 0.95), 3),
            "raw_http_exec_p50_ms": round(raw_p50, 3),
            "raw_http_exec_p95_ms": round(pct(raw_ms, 0.95), 3),
            "sdk_exec_mean_ms": round(statistics.fmean(sdk_ms), 3),
            "raw_http_exec_mean_ms": round(statistics.fmean(raw_ms), 3),
            "sdk_overhead_pct": round((sdk_p50 / raw_p50 - 1) * 100, 2),
        }
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
