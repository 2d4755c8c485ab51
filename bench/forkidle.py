"""Fork and idle resume through the HTTP API, on real guests.

    python bench/forkidle.py [--count 10] [--samples 7] [--workers 2]

Starts everything it needs in a temporary directory, as bench/sdk.py does (an embedded SQLite
database, ``manage.py worker``, ``manage.py serve --no-worker`` on 127.0.0.1, an operator with a
token; quotas and the CPU overcommit raised so that a source and its --count forks fit), then:

* ``fork_10_s``: a running linux-small VM (from the template's saved state), then the wall time
  from ``POST /api/v1/vms/{id}/fork/ {"count": N}`` until every one of the N new VMs has answered
  an exec of ``true`` through the API (each polled in turn; a VM still restoring answers 409).
  The worker takes the snapshot once and restores the N VMs (``--workers`` restore in parallel);
  ``fork_snapshot_s`` and ``fork_first_answered_s`` say when the snapshot was ready and when the
  first new VM answered.
* ``idle_resume_exec_p50_ms``: a VM with an idle policy of 1 s; for each sample, wait (untimed)
  until the worker's idle tick has paused it, then time one exec of ``true`` through the API:
  the web process resumes the VM inline (its resume request and outcome, reason activity) and
  runs the exec. The median of --samples, with the p95 and the median of execs on a running VM
  (``running_exec_p50_ms``) measured in the same run as the baseline.
* ``idle_disk_resume_exec_p50_ms``: the same with ``idle_to_disk``: each exec restores the VM
  from its saved state first (its file checked, a new VMM, the guest's clock and identity).

Importable: ``server()`` (a context manager giving ``(url, token)``), ``fork_10_s(url, token)``
and ``idle_resume_exec_p50_ms(url, token)``, each creating and destroying its own VMs; a server
started elsewhere needs ``SANDBOX_QUOTA_VMS`` above the count and room for count + 1 VMs
(``SANDBOX_CPU_OVERCOMMIT``). The last line of output is one JSON object with the figures.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEMPLATE = "linux-small"
READY_TIMEOUT_S = 300.0
# The last fork_10_s run's phases: seconds from the POST until its snapshot was ready
# (``snapshot_s``) and until the first new VM answered (``first_answered_s``).
PHASES: dict[str, float] = {}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _client(url: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120)


def _vm(api: httpx.Client, vm_id: str) -> dict[str, Any]:
    answer = api.get(f"/api/v1/vms/{vm_id}/")
    answer.raise_for_status()
    return answer.json()


def _wait_state(
    api: httpx.Client, vm_id: str, state: str, timeout: float = READY_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        vm = _vm(api, vm_id)
        if vm["state"] == state:
            return
        if vm["state"] in ("failed", "crashed", "destroyed") or time.monotonic() > deadline:
            raise RuntimeError(f"VM {vm_id} is {vm['state']}, not {state}: {vm.get('last_error')}")
        time.sleep(0.1)


def _running_vm(api: httpx.Client, name: str) -> str:
    answer = api.post("/api/v1/vms/", json={"name": name, "template": TEMPLATE})
    if answer.status_code != 202:
        raise RuntimeError(f"create {name}: {answer.status_code} {answer.text}")
    vm_id = answer.json()["vm"]["id"]
    _wait_state(api, vm_id, "running")
    return vm_id


def _exec_true(api: httpx.Client, vm_id: str) -> httpx.Response:
    return api.post(f"/api/v1/vms/{vm_id}/exec/", json={"argv": ["true"]})


def _destroy(api: httpx.Client, vm_ids: list[str]) -> None:
    for vm_id in vm_ids:
        with contextlib.suppress(httpx.HTTPError):
            api.delete(f"/api/v1/vms/{vm_id}/")
    deadline = time.monotonic() + 120
    for vm_id in vm_ids:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if _vm(api, vm_id)["state"] == "destroyed":
                    break
            time.sleep(0.2)


def fork_10_s(url: str, token: str, *, count: int = 10) -> float:
    """Seconds from the fork's POST (``count`` VMs) until all of them answered an exec."""
    made: list[str] = []
    with _client(url, token) as api:
        try:
            source = _running_vm(api, f"bench-fork-src-{os.getpid()}")
            made.append(source)
            assert _exec_true(api, source).status_code == 200
            began = time.perf_counter()
            answer = api.post(f"/api/v1/vms/{source}/fork/", json={"count": count})
            if answer.status_code != 202:
                raise RuntimeError(f"fork: {answer.status_code} {answer.text}")
            body = answer.json()
            waiting = [v["id"] for v in body["vms"]]
            made += waiting
            snapshot_url = f"/api/v1/snapshots/{body['snapshot']['id']}/"
            PHASES.clear()
            deadline = time.monotonic() + READY_TIMEOUT_S
            while waiting:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{len(waiting)} forked VMs never answered an exec")
                if "snapshot_s" not in PHASES and api.get(snapshot_url).json()["state"] == "ready":
                    PHASES["snapshot_s"] = round(time.perf_counter() - began, 2)
                for vm_id in list(waiting):
                    state = _vm(api, vm_id)["state"]
                    if state == "failed":
                        raise RuntimeError(f"forked VM {vm_id} failed")
                    if state != "running":
                        continue
                    reply = _exec_true(api, vm_id)
                    if reply.status_code == 200 and reply.json()["exit_code"] == 0:
                        waiting.remove(vm_id)
                        PHASES.setdefault("first_answered_s", time.perf_counter() - began)
                if waiting:
                    time.sleep(0.1)
            PHASES["first_answered_s"] = round(PHASES["first_answered_s"], 2)
            return time.perf_counter() - began
        finally:
            _destroy(api, made)


def idle_resume_exec_p50_ms(
    url: str, token: str, *, samples: int = 7, to_disk: bool = False
) -> dict[str, Any]:
    """Execs through the API on a VM the idle tick paused: their median and p95 (ms), and the
    median of execs on the same VM running (the baseline, same run). ``to_disk``: the policy
    suspends it to disk, and the figures are ``idle_disk_resume_exec_*`` (the restore from
    the file included)."""
    made: list[str] = []
    key = "idle_disk_resume_exec" if to_disk else "idle_resume_exec"
    with _client(url, token) as api:
        try:
            vm_id = _running_vm(api, f"bench-idle{'disk' if to_disk else ''}-{os.getpid()}")
            made.append(vm_id)
            running: list[float] = []
            for _ in range(samples + 2):
                began = time.perf_counter()
                assert _exec_true(api, vm_id).status_code == 200
                running.append((time.perf_counter() - began) * 1000)
            policy = {"idle_timeout_s": 1, "idle_to_disk": to_disk}
            answer = api.post(f"/api/v1/vms/{vm_id}/idle/", json=policy)
            answer.raise_for_status()
            resumed: list[float] = []
            for _ in range(samples):
                _wait_state(api, vm_id, "paused", timeout=60)
                shown = _vm(api, vm_id)
                if not shown["idle_paused"] or shown["suspended_to_disk"] is not to_disk:
                    raise RuntimeError(f"paused, but not as the policy says: {shown}")
                began = time.perf_counter()
                reply = _exec_true(api, vm_id)
                elapsed = (time.perf_counter() - began) * 1000
                if reply.status_code != 200 or reply.json()["exit_code"] != 0:
                    raise RuntimeError(f"exec on the idle VM: {reply.status_code} {reply.text}")
                resumed.append(elapsed)
            result = {
                f"{key}_p50_ms": round(statistics.median(resumed), 1),
                f"{key}_p95_ms": round(pct(resumed, 0.95), 1),
                f"{key.removesuffix('_exec')}_samples": len(resumed),
                f"{'disk_' if to_disk else ''}running_exec_p50_ms": round(
                    statistics.median(running[2:]), 1
                ),
            }
            return result
        finally:
            _destroy(api, made)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:  # noqa: S310
                if r.status == 200:
                    return
        time.sleep(0.2)
    raise SystemExit(f"the server at {url} did not answer")


@contextlib.contextmanager
def server(workers: int = 2, vms: int = 20) -> Iterator[tuple[str, str]]:
    """A server of its own in a temporary directory (embedded SQLite, ``manage.py worker``
    with ``workers`` processes, ``serve --no-worker``): ``(url, token)`` of an operator whose
    quota and the host's CPU overcommit leave room for ``vms`` linux-small VMs. Configures
    Django in this process (call it once per process)."""
    tmp = Path(tempfile.mkdtemp(prefix="sbx-bench-forkidle-"))
    run = Path(f"/tmp/sbxbf-{os.getpid()}")
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
        SANDBOX_WORKERS=str(workers),
        SANDBOX_NETWORKING="off",  # exec needs no NIC; no namespace on this machine
        SANDBOX_LOG_LEVEL="WARNING",
        SANDBOX_QUOTA_VMS=str(vms),
        SANDBOX_QUOTA_VCPUS=str(vms * 2),
        SANDBOX_QUOTA_MEMORY_MIB=str(vms * 1024),
        SANDBOX_CPU_OVERCOMMIT=str(max(4, vms)),
        DJANGO_SECRET_KEY="bench-forkidle-" + os.urandom(8).hex(),
    )
    os.environ.clear()
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command

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
        port = _free_port()
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
        _wait_ready(url, 60)
        yield url, token
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10, help="VMs per fork")
    parser.add_argument("--samples", type=int, default=7, help="idle resumes timed")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    args = parser.parse_args()
    with server(workers=args.workers, vms=args.count + 5) as (url, token):
        result: dict[str, Any] = {"bench": "forkidle", "count": args.count, "workers": args.workers}
        result |= idle_resume_exec_p50_ms(url, token, samples=args.samples)
        result |= idle_resume_exec_p50_ms(url, token, samples=args.samples, to_disk=True)
        result["fork_10_s" if args.count == 10 else f"fork_{args.count}_s"] = round(
            fork_10_s(url, token, count=args.count), 2
        )
        result |= {f"fork_{k}": v for k, v in PHASES.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
