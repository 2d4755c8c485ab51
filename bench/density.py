"""How many idle guests this host holds: boot idle VMs from the template until one fails to
answer its agent within 1 s or host memory is 80 % used.

    python bench/density.py [--max 60] [--window 30] [--limit-s 1.0]

On a throwaway PostgreSQL database, VMs (linux-small: 1 vCPU, 256 MiB) are created and started
one after another through the ordinary start request (``vms.worker``: a restore of the
template's saved state). After each start, every running VM's agent is asked for its health
(hello + health over the agent channel); the run stops when one takes longer than --limit-s or
fails, when MemAvailable is under 20 % of MemTotal, or at --max VMs. Then, with every VM idle,
for --window seconds:

- ``host_cpu_percent_idle``: the host's busy CPU (/proc/stat, all cores = 100 %; other tenants
  of a shared machine included), and ``vmm_cpu_percent_per_vm`` (each VMM process, % of a core);
- ``control_plane_cpu_percent``: the worker main process's part (the pressure and usage
  sampling ticks every second, their tasks run in place, as ``bench/resources.py`` does) plus its
  PostgreSQL backend, in % of the host (all cores);
- ``rss_mib_per_vm``: the VMM processes' resident memory, the mean.

``idle_vms`` is the number of VMs that answered in time (the last one started, if it did not,
is not counted). The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.event_store import throwaway_database  # noqa: E402
from bench.resources import Loop, cpu_seconds, log  # noqa: E402


def meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0]) // 1024
    return out


def host_busy() -> tuple[float, float]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def ask_all(vms: list[Any], limit_s: float) -> tuple[float, str | None]:
    """The slowest agent answer, and the first failure (None: all answered in time)."""
    from vms import guest

    slowest = 0.0
    for vm in vms:
        t0 = time.monotonic()
        try:
            with guest.agent_session(vm, hello_timeout=limit_s) as client:
                client.health()
        except Exception as exc:  # noqa: BLE001 - the reason is the result
            return max(slowest, time.monotonic() - t0), f"{vm.name}: {exc}"
        took = time.monotonic() - t0
        slowest = max(slowest, took)
        if took > limit_s:
            return slowest, f"{vm.name}: answered in {took:.2f}s"
    return slowest, None


def run(args: argparse.Namespace) -> dict[str, Any]:
    import django

    django.setup()
    import django_q.tasks
    from django.conf import settings
    from django.core.management import call_command
    from django.utils.module_loading import import_string

    from accounts import commands as account_commands
    from accounts.caller import Caller
    from audit.actor import Actor
    from vms import commands, images, runtime, worker
    from vms.hypervisors import reconcile as scanner
    from vms.models import Quota, VirtualMachine

    call_command("migrate", verbosity=0)
    os.environ["SANDBOX_IMAGE_DIR"] = str(images.ensure_built().directory)
    django_q.tasks.async_task = lambda func, *a, **kw: import_string(func)(*a)  # type: ignore[assignment]
    user = account_commands.create_user(
        Actor.system(channel="shell", name="bench"),
        username="bench",
        password="bench-Password-1",
        role="operator",
    )
    caller = Caller.for_user(user, channel="shell")
    n = args.max
    Quota.objects.update_or_create(
        user=user,
        defaults={
            "max_vms": n + 1,
            "max_vcpus": 2 * n,
            "max_memory_mib": 512 * n,
            "max_disk_mib": 1024 * n,
        },
    )
    settings.SANDBOX_CPU_OVERCOMMIT = 64.0  # density is what is measured here, not the policy
    results: dict[str, Any] = {}
    running: list[Any] = []
    ids: list[Any] = []
    stop_reason = f"--max {n} reached"
    loop = Loop()
    try:
        total = meminfo()["MemTotal"]
        for i in range(n):
            t0 = time.monotonic()
            accepted = commands.create(caller, name=f"dense-{i}", template="linux-small")
            ids.append(accepted.vm_id)
            outcome = worker.handle(accepted.request.event_id)
            start_s = time.monotonic() - t0
            if outcome != "vm.started":
                stop_reason = f"VM {i} did not start: {outcome}"
                break
            running.append(VirtualMachine.objects.get(pk=accepted.vm_id))
            slowest, failed = ask_all(running, args.limit_s)
            used = 1 - meminfo()["MemAvailable"] / total
            log(f"{len(running)} VMs: start {start_s:.1f}s, slowest agent {slowest:.2f}s, "
                f"memory {used:.0%}")  # fmt: skip
            if failed is not None:
                stop_reason = f"an agent did not answer within {args.limit_s}s ({failed})"
                running.pop()
                break
            if used >= 0.8:
                stop_reason = "host memory 80 % used"
                break
        results["idle_vms"] = len(running)
        results["stop_reason"] = stop_reason
        pids = [runtime.runtime_dir(vm.pk).pid() for vm in running]
        rss = [rss_mib(p) for p in pids if p]
        results["rss_mib_per_vm"] = round(sum(rss) / max(1, len(rss)), 1)

        loop.start()
        loop.ready.wait(30)
        time.sleep(5)
        vmm0 = {p: cpu_seconds(p) for p in pids if p}
        busy0, all0 = host_busy()
        loop0, t0 = loop.cpu(), time.monotonic()
        time.sleep(args.window)
        wall = time.monotonic() - t0
        busy1, all1 = host_busy()
        cores = os.cpu_count() or 1
        results["host_cpu_percent_idle"] = round((busy1 - busy0) / (all1 - all0) * 100, 1)
        per_vm = [(cpu_seconds(p) - c) / wall * 100 for p, c in vmm0.items()]
        results["vmm_cpu_percent_per_vm"] = round(sum(per_vm) / max(1, len(per_vm)), 2)
        plane = (loop.cpu() - loop0) / wall * 100
        results["control_plane_cpu_percent"] = round(plane / cores, 3)
        results["control_plane_cpu_percent_of_a_core"] = round(plane, 3)
        slowest, failed = ask_all(running, args.limit_s)
        results["slowest_agent_s_idle"] = round(slowest, 3)
        results["host_cpus"] = cores
        results["host_memory_mib"] = total
        results["host_memory_used_percent"] = round(
            (1 - meminfo()["MemAvailable"] / total) * 100, 1
        )
    finally:
        loop.stop.set()
        if loop.is_alive():
            loop.join(10)
        for vm_id in ids:
            vm = VirtualMachine.objects.get(pk=vm_id)
            if vm.state != "destroyed":
                try:
                    worker.handle(commands.destroy(caller, vm).request.event_id)
                except Exception as exc:  # noqa: BLE001 - the scan below kills what is left
                    log(f"destroy {vm_id}: {exc}")
        report = scanner.scan(Path(settings.SANDBOX_RUNTIME_DIR), known_ids=[])
        scanner.teardown_orphans(list(report.orphans))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max", type=int, default=60)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--limit-s", type=float, default=1.0)
    args = parser.parse_args()
    run_dir = Path(f"/tmp/sbd-{os.getpid()}")
    data = Path(f"/tmp/sbd-data-{os.getpid()}")
    with throwaway_database("sandbox_bench_density") as url:
        os.environ["DATABASE_URL"] = url
        os.environ["SANDBOX_DATA_DIR"] = str(data)
        os.environ["SANDBOX_RUNTIME_DIR"] = str(run_dir)
        os.environ["DJANGO_SETTINGS_MODULE"] = "sandbox_site.settings"
        os.environ["SANDBOX_LOG_LEVEL"] = "WARNING"
        try:
            results = run(args)
        finally:
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.rmtree(data, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
