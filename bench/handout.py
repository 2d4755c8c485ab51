"""Create-to-exec through the public HTTP API: a warm pool hand-out, a cold (template restore)
create, and the driver's bare restore, measured in one run.

    python bench/handout.py [--template linux-small] [--pool 4] [--warm 20] [--cold 5]

Creates a throwaway PostgreSQL database (DATABASE_URL's server, else the local one), migrates it,
seeds an operator and an admin with API tokens, and starts the server the way `make run` does
(`manage.py serve`: web and worker) with ``SANDBOX_POOLS=<template>=<pool>`` and networking off.
Then, as a user would, with the token:

* ``warm``: after ``--warmup`` rounds not counted (the server's first create and exec), the pool
  full and the host quiet, ``POST /api/v1/vms/`` then ``POST
  /api/v1/vms/{id}/exec/`` (``true``) until the exec answers; the VM destroyed, the pool refilled
  before the next round. ``warm_create_to_exec_p50_ms`` / ``_p99_ms``, and the create's own.
* ``cold``: the pool emptied (the admin's ``PUT /api/v1/pools/{template}/`` target 0), the same
  create, then exec polled until it answers: the template restore by the worker.
  ``cold_create_to_exec_p50_ms``.
* ``bare_restore``: in this process, the driver's restore of the template's saved state plus
  the agent's first answer, no product around it (``bare_restore_s``, median).
* ``idle``: a VM given a short idle policy, paused by the worker's tick, then an exec through the
  API that resumes it (``idle_resume_exec_p50_ms``, with the running VM's exec as baseline;
  bench/forkidle.py), and the same with the disk mode (``idle_disk_resume_exec_p50_ms``: the
  VM suspended to disk and restored from its file by the exec).
* ``fork``: ``POST /api/v1/vms/{id}/fork/ {"count": 10}`` of a running VM until all 10 answered an
  exec (``fork_10_s``; bench/forkidle.py).

Each phase is one function of ``PHASES`` taking the run's context and answering its figures, so
phases can be added. The last line of output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after ROOT: bench/audit.py must not shadow audit/

from api import ensure_redis, free_port, start_server, stop_server  # noqa: E402
from event_store import throwaway_database  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Api:
    """One keep-alive connection with a token: what a user's client does."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=payload, headers=headers)
                resp = self.conn.getresponse()
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                if attempt:
                    raise
        raise AssertionError("unreachable")


@dataclass
class Run:
    args: argparse.Namespace
    user: Api
    admin: Api
    figures: dict[str, Any] = field(default_factory=dict)


def wait_until(what: str, predicate: Callable[[], bool], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def pool_of(run: Run) -> dict[str, Any]:
    status, body = run.admin.call("GET", "/api/v1/pools/")
    assert status == 200, (status, body)
    for pool in body["pools"]:
        if pool["template"] == run.args.template:
            return pool
    return {"target": 0, "ready": 0, "warming": 0}


def destroy(run: Run, vm_id: str) -> None:
    status, body = run.user.call("DELETE", f"/api/v1/vms/{vm_id}/")
    assert status in (200, 202, 204), (status, body)

    def gone() -> bool:
        s, b = run.user.call("GET", f"/api/v1/vms/{vm_id}/")
        return s == 404 or (b or {}).get("state") == "destroyed"

    wait_until(f"VM {vm_id} destroyed", gone)


def create_then_exec(run: Run, name: str) -> tuple[float, float, int]:
    """(create to first exec answered, create alone, create's status), in seconds."""
    t0 = time.perf_counter()
    status, body = run.user.call(
        "POST", "/api/v1/vms/", {"name": name, "template": run.args.template}
    )
    created = time.perf_counter() - t0
    assert status in (201, 202), (status, body)
    vm_id = body["vm"]["id"]
    while True:
        s, b = run.user.call("POST", f"/api/v1/vms/{vm_id}/exec/", {"argv": ["true"]})
        if s == 200 and b["exit_code"] == 0:
            break
        if s not in (409, 503):
            raise SystemExit(f"exec answered {s}: {b}")
        if time.perf_counter() - t0 > 300:
            raise SystemExit("the VM never answered exec")
        time.sleep(0.05)
    total = time.perf_counter() - t0
    destroy(run, vm_id)
    return total, created, status


# --- phases: each takes the run and returns its figures ---------------------------------------


def member_rss_mib(run: Run) -> float:
    """Median resident memory of the VMMs under the runtime root (at a full pool with no VM:
    the pool members), from /proc."""
    from vms.hypervisors.base import RuntimeDir

    sizes = []
    for d in Path(os.environ["SANDBOX_RUNTIME_DIR"]).iterdir():
        pid = RuntimeDir(d).pid() if d.is_dir() else None
        if pid:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            kib = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS:"))
            sizes.append(kib / 1024)
    return round(statistics.median(sizes), 1) if sizes else 0.0


def handout_steps() -> dict[str, float]:
    """The medians of the hand-outs' step times, as their vm.started events record them (ms
    since the hand-out began, cumulative: lock, connect, resume, identity: hello, configure and
    rotate in one round trip)."""
    from audit.models import Event

    steps: dict[str, list[float]] = {}
    for event in Event.objects.filter(type="vm.started"):
        for step, ms in (event.payload.get("handout_ms") or {}).items():
            steps.setdefault(step, []).append(ms)
    return {step: round(statistics.median(v), 1) for step, v in steps.items()}


def first_exec_steps() -> dict[str, float]:
    """Of the first exec of each VM handed out by a pool, as its ``vm.exec_completed`` records
    it: the server's time from the agent session to the exit (``wall_ms``) and the command's own
    in the guest (``duration_ms``); medians."""
    from audit.models import Event

    pooled = {
        e.aggregate_id
        for e in Event.objects.filter(type="vm.started")
        if (e.payload or {}).get("from_pool")
    }
    firsts: dict[str, Any] = {}
    for event in Event.objects.filter(type="vm.exec_completed").order_by("position"):
        if event.aggregate_id in pooled and event.aggregate_id not in firsts:
            firsts[event.aggregate_id] = event.payload
    if not firsts:
        return {}
    return {
        "wall_ms": round(statistics.median(p["wall_s"] * 1000 for p in firsts.values()), 1),
        "duration_ms": round(statistics.median(p["duration_s"] * 1000 for p in firsts.values()), 1),
    }


def phase_warm(run: Run) -> dict[str, Any]:
    target = run.args.pool
    totals, creates, fallbacks = [], [], 0
    wait_until("the pool full", lambda: pool_of(run)["ready"] >= target)
    rss = member_rss_mib(run)
    for i in range(-run.args.warmup, run.args.warm):
        wait_until(
            "the pool full", lambda: pool_of(run)["ready"] >= target and not pool_of(run)["warming"]
        )
        time.sleep(run.args.settle)  # the refill's restore done: a quiet host, as when idle
        total, created, status = create_then_exec(run, f"warm-{i}-{uuid.uuid4().hex[:6]}")
        if i < 0:
            log(f"warm-up round: to exec {total * 1000:.1f} ms (not counted)")
            continue  # the server's first create and exec (lazy imports, first connections)
        fallbacks += status != 201
        totals.append(total * 1000)
        creates.append(created * 1000)
        log(f"warm {i}: create {created * 1000:.1f} ms, to exec {total * 1000:.1f} ms ({status})")
    return {
        "pool_target": target,
        "warm_rounds": len(totals),
        "warm_not_from_pool": fallbacks,
        "warm_create_to_exec_p50_ms": round(statistics.median(totals), 1),
        "warm_create_to_exec_p99_ms": round(pct(totals, 0.99), 1),
        "warm_create_p50_ms": round(statistics.median(creates), 1),
        "warm_first_exec_p50_ms": round(
            statistics.median(t - c for t, c in zip(totals, creates, strict=True)), 1
        ),
        "warm_handout_steps_p50_ms": handout_steps(),
        "warm_first_exec_guest_p50_ms": first_exec_steps(),
        "pool_running": os.environ.get("SANDBOX_POOL_RUNNING", "") not in ("", "0", "false"),
        "pool_member_rss_mib": rss,
    }


def phase_cold(run: Run) -> dict[str, Any]:
    status, body = run.admin.call("PUT", f"/api/v1/pools/{run.args.template}/", {"target": 0})
    assert status == 200, (status, body)
    wait_until("the pool empty", lambda: not pool_of(run)["ready"] and not pool_of(run)["warming"])
    totals = []
    for i in range(run.args.cold):
        time.sleep(run.args.settle)
        total, created, status = create_then_exec(run, f"cold-{i}-{uuid.uuid4().hex[:6]}")
        assert status == 202, status
        totals.append(total * 1000)
        log(f"cold {i}: to exec {total * 1000:.1f} ms")
    return {
        "cold_rounds": len(totals),
        "cold_create_to_exec_p50_ms": round(statistics.median(totals), 1),
    }


def phase_bare_restore(run: Run) -> dict[str, Any]:
    """The driver alone: restore the template's saved state and greet its agent."""
    from vms import images, runtime, worker
    from vms.agent.client import AgentClient
    from vms.hypervisors.base import RuntimeDir
    from vms.hypervisors.templates import TemplateCache
    from vms.models import Template, VirtualMachine

    tpl = Template.objects.get(name=run.args.template)
    hv = runtime.hypervisor()
    cache = hv.template_cache(worker.TEMPLATE_HOOKS)
    assert cache is not None, "this hypervisor has no saved-state templates"
    work = Path(tempfile.mkdtemp(prefix="hb-", dir="/tmp"))
    times = []
    try:
        for i in range(run.args.bare):
            vm_id = uuid.uuid4()
            stand_in = VirtualMachine(
                id=vm_id, boot=tpl.boot, image=tpl.image, vcpus=tpl.vcpus,
                memory_mib=tpl.memory_mib, disk_mib=tpl.disk_mib, hostname="bare",
            )  # fmt: skip
            spec = runtime.build_spec(stand_in)
            disk = work / f"d{i}.img"
            images.make_data_disk(disk, tpl.disk_mib)
            spec = spec.replace(
                disks=tuple(d if d.readonly else d.__class__(disk, False, "raw", d.id)
                            for d in spec.disks)
            )  # fmt: skip
            snap = cache.ensure(spec)
            rt = RuntimeDir(work / f"r{i}")
            rt.create()
            t0 = time.perf_counter()
            hv.restore(spec, rt, snap)
            try:
                client = AgentClient.from_hypervisor(
                    hv, rt, credential=TemplateCache.guest_secret(snap), timeout=30
                )
                with client:
                    client.hello(timeout=30, interval=0.02)
                times.append(time.perf_counter() - t0)
            finally:
                hv.destroy(rt)
            log(f"bare restore {i}: {times[-1]:.3f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"bare_restore_s": round(statistics.median(times), 3)}


def phase_idle(run: Run) -> dict[str, Any]:
    """Execs on a VM its idle policy paused (bench/forkidle.py), with the running baseline."""
    import forkidle

    url = f"http://127.0.0.1:{run.user.port}"
    kept = forkidle.idle_resume_exec_p50_ms(url, run.user.token, samples=run.args.idle)
    # The same with the policy's disk mode: each exec restores the VM from its saved state.
    on_disk = forkidle.idle_resume_exec_p50_ms(
        url, run.user.token, samples=run.args.idle, to_disk=True
    )
    return kept | on_disk


def phase_fork(run: Run) -> dict[str, Any]:
    """A fork of 10 of a running VM, until all 10 answered an exec (bench/forkidle.py)."""
    import forkidle

    seconds = forkidle.fork_10_s(f"http://127.0.0.1:{run.user.port}", run.user.token, count=10)
    return {"fork_10_s": round(seconds, 2)} | {f"fork_{k}": v for k, v in forkidle.PHASES.items()}


# Run in this order: the warm phase first (the pool the server filled at start), then cold
# (it empties the pool), then the driver alone, then an idle VM's resume and a fork (with the
# pool empty: its refills would compete for the two cores).
PHASES: list[tuple[str, Callable[[Run], dict[str, Any]]]] = [
    ("warm", phase_warm),
    ("cold", phase_cold),
    ("bare_restore", phase_bare_restore),
    ("idle", phase_idle),
    ("fork", phase_fork),
]


def seed() -> tuple[str, str]:
    from accounts import commands as accounts
    from audit.actor import Actor
    from vms.models import Quota

    user = accounts.create_user(Actor.system(), username="bench", password=None, role="operator")
    Quota.objects.create(
        user=user, max_vms=100000, max_vcpus=1000000, max_memory_mib=10**9, max_disk_mib=10**9
    )
    admin = accounts.create_user(
        Actor.system(), username="bench-admin", password=None, role="admin"
    )
    return (
        accounts.create_token(Actor.system(), user, name="bench").plaintext,
        accounts.create_token(Actor.system(), admin, name="bench").plaintext,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", default="linux-small")
    parser.add_argument("--pool", type=int, default=4, help="the pool target")
    parser.add_argument("--warm", type=int, default=20, help="warm rounds")
    parser.add_argument("--cold", type=int, default=5, help="cold rounds")
    parser.add_argument("--warmup", type=int, default=1, help="warm rounds not counted")
    parser.add_argument("--bare", type=int, default=3, help="bare restores")
    parser.add_argument("--idle", type=int, default=7, help="idle resumes timed")
    parser.add_argument("--settle", type=float, default=0.5, help="seconds of quiet per round")
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument(
        "--phases", default=",".join(name for name, _ in PHASES), help="which, in order"
    )
    args = parser.parse_args()

    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/9")
    ensure_redis(redis_url)
    data_dir = ROOT / "var" / f"bench-handout-{os.getpid()}"
    figures: dict[str, Any] = {}
    try:
        with throwaway_database("sandbox_bench_handout") as url:
            env = dict(os.environ)
            env.update(
                DATABASE_URL=url,
                REDIS_URL=redis_url,
                SANDBOX_DATA_DIR=str(data_dir),
                SANDBOX_RUNTIME_DIR=f"/tmp/hb-run-{os.getpid()}",
                SANDBOX_LOG_LEVEL="WARNING",
                # No namespace of the bench's own on this machine: the figures are without NICs
                # (a hand-out with one also plugs its TAP and sets the guest's address).
                SANDBOX_NETWORKING="off",
                SANDBOX_POOLS=f"{args.template}={args.pool}",
                # A fork of 10 beside the rest: the host's CPU commitment allows it.
                SANDBOX_CPU_OVERCOMMIT="32",
                DJANGO_SETTINGS_MODULE="sandbox_site.settings",
            )
            os.environ.update(env)
            import django

            django.setup()
            from django.core.management import call_command
            from django.db import connections

            call_command("migrate", verbosity=0)
            user_token, admin_token = seed()
            connections.close_all()
            port = free_port()
            argv = [sys.executable, str(ROOT / "manage.py"), "serve", "--port", str(port)]
            server = start_server([*argv, "--web-workers", str(args.web_workers)], env, port)
            try:
                run = Run(args, Api(port, user_token), Api(port, admin_token), figures)
                wanted = args.phases.split(",")
                for name, phase in PHASES:
                    if name in wanted:
                        log(f"phase {name}")
                        figures.update(phase(run))
            finally:
                stop_server(server)
                connections.close_all()
                # VMMs run in sessions of their own and outlive the server (by design): those
                # of this throwaway run (pool members, a VM an error left) go with it.
                from vms.hypervisors import reconcile as scanner

                left = scanner.scan(Path(env["SANDBOX_RUNTIME_DIR"]), known_ids=[]).orphans
                scanner.teardown_orphans(left)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(f"/tmp/hb-run-{os.getpid()}", ignore_errors=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
