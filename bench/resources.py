"""The host pressure loop's own cost and reaction, with real guests, and one VM's history query.

    python bench/resources.py [--vms 20] [--window 60] [--hog-mib 2048]

On a throwaway PostgreSQL database: --vms real QEMU guests (linux-small, 256 MiB) started from
the template's saved state through the ordinary start request (``vms.worker``), half of them low
priority, a quarter normal, a quarter high. A thread plays the worker's main process: every
second it runs the pressure tick (``vms.pressure.tick``) and the usage sampling tick
(``vms.usage.tick``), the tasks they enqueue carried out at once in that thread (the broker's
latency is not in these figures).

- ``loop_cpu_percent``: CPU of that thread's process (the bench's main thread only sleeps) plus
  its PostgreSQL backend, over --window seconds, in % of one core: the larger of a calm window
  (nothing to do) and a window under pressure (every low VM ballooned, the rest not due).
- ``pressure_reaction_s``: real pressure is induced by a host process that touches --hog-mib
  MiB while the memory threshold sits half of that below the MemAvailable measured just before
  (its release value a quarter below; during the calm window both are 0); from the moment a 10 ms poll of /proc/meminfo sees MemAvailable cross the
  threshold to the first ``vm.ballooned`` committed.
- ``release_s``: from the hog's exit to the last ``vm.balloon_released`` (hold time 0).
- ``history_query_ms``: one VM's last 7 days (``vms.usage.series``) over a year of synthetic
  history (as ``bench/usage_query.py`` fills it), the median of 30.
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.event_store import throwaway_database  # noqa: E402
from bench.usage_query import DAY, fill, timed  # noqa: E402

HOG = (
    "import sys, time\n"
    "b = bytearray({mib} << 20)\n"
    "for i in range(0, len(b), 4096): b[i] = 1\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemAvailable")


def cpu_seconds(pid: int | str = "self") -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Loop(threading.Thread):
    """The worker cluster's part: the main process's ticks every second in this thread; the
    tasks they enqueue carried out by two other threads (the cluster's worker processes)."""

    def __init__(self, profile: str | None = None) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.backends: set[int] = set()
        self.ready = threading.Event()
        self.errors: list[str] = []
        self.profile = profile
        self.profiles: list[Any] = []
        self.plock = threading.Lock()
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="task")
        self._local = threading.local()

    def _backend(self) -> None:
        from django.db import connection

        if getattr(self._local, "pid", None) is None:
            with connection.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                self._local.pid = cur.fetchone()[0]
            self.backends.add(self._local.pid)

    def enqueue(self, func: str, *args: Any, **kwargs: Any) -> None:
        from django.utils.module_loading import import_string

        def task() -> None:
            self._backend()
            prof = cProfile.Profile() if self.profile else None
            try:
                if prof is not None:
                    prof.enable()
                import_string(func)(*args)
            except Exception as exc:  # noqa: BLE001 - reported, the loop goes on
                self.errors.append(repr(exc))
            finally:
                if prof is not None:
                    prof.disable()
                    with self.plock:
                        self.profiles.append(prof)

        self.pool.submit(task)

    def run(self) -> None:
        from django.db import connection
        from django.utils import timezone

        from vms import pressure, usage

        self._backend()
        # Every task thread's connection, before anything is measured.
        list(self.pool.map(lambda _: self._backend(), range(8)))
        self.ready.set()
        while not self.stop.is_set():
            t0 = time.monotonic()
            now = timezone.now()
            prof = cProfile.Profile() if self.profile else None
            if prof is not None:
                prof.enable()
            for tick in (pressure.tick, usage.tick):
                try:
                    tick(now)
                except Exception as exc:  # noqa: BLE001 - reported, the loop goes on
                    self.errors.append(repr(exc))
            if prof is not None:
                prof.disable()
                with self.plock:
                    self.profiles.append(prof)
            self.stop.wait(max(0.0, 1.0 - (time.monotonic() - t0)))
        self.pool.shutdown(wait=True)
        connection.close()

    def cpu(self) -> float:
        return cpu_seconds() + sum(cpu_seconds(pid) for pid in self.backends)

    def dump_profile(self) -> None:
        if not self.profile or not self.profiles:
            return
        with self.plock:
            stats = pstats.Stats(self.profiles[0])
            for prof in self.profiles[1:]:
                stats.add(prof)
        stats.dump_stats(self.profile)


def cpu_window(loop: Loop, seconds: float) -> float:
    c0, t0 = loop.cpu(), time.monotonic()
    time.sleep(seconds)
    return (loop.cpu() - c0) / (time.monotonic() - t0) * 100.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    import django

    django.setup()
    import django_q.tasks
    from django.conf import settings
    from django.core.management import call_command

    from accounts import commands as account_commands
    from accounts.caller import Caller
    from audit.actor import Actor
    from audit.models import Event
    from vms import commands, images, usage, worker
    from vms.hypervisors import reconcile as scanner
    from vms.models import Quota, VirtualMachine

    call_command("migrate", verbosity=0)
    image = images.ensure_built()
    os.environ["SANDBOX_IMAGE_DIR"] = str(image.directory)
    loop = Loop(args.profile)
    # The tasks the ticks enqueue, carried out by the loop's task threads.
    django_q.tasks.async_task = loop.enqueue  # type: ignore[assignment]

    user = account_commands.create_user(
        Actor.system(channel="shell", name="bench"),
        username="bench",
        password="bench-Password-1",
        role="operator",
    )
    caller = Caller.for_user(user, channel="shell")
    n = args.vms
    Quota.objects.update_or_create(
        user=user,
        defaults={
            "max_vms": n + 2,
            "max_vcpus": 2 * n,
            "max_memory_mib": 512 * n,
            "max_disk_mib": 1024 * n,
        },
    )
    priorities = ["low"] * (n - n // 2) + ["normal"] * (n // 4) + ["high"] * (n // 2 - n // 4)
    ids = []
    results: dict[str, Any] = {"vms": n}
    hog: subprocess.Popen[str] | None = None
    try:
        # One VM's week of history (a year of synthetic history behind it), on a quiet host and
        # again with the guests running.
        first_vm = commands.create(
            caller, name="res-history", template="linux-small", start_now=False
        ).vm_id
        now = int(time.time())
        fill([first_vm], now)

        def week() -> object:
            return usage.series([first_vm], now - 7 * DAY, now, 1800, now=now)

        week_ms, week_p95 = timed(week, 30)
        results["history_query_ms"] = round(week_ms, 2)
        results["history_query_p95_ms"] = round(week_p95, 2)
        t0 = time.monotonic()
        for i, priority in enumerate(priorities):
            accepted = commands.create(
                caller, name=f"res-{i}", template="linux-small", priority=priority
            )
            ids.append(accepted.vm_id)
            outcome = worker.handle(accepted.request.event_id)
            if outcome != "vm.started":
                raise RuntimeError(f"VM {i}: {outcome}")
        log(f"{n} VMs running in {time.monotonic() - t0:.1f}s")
        results["start_all_s"] = round(time.monotonic() - t0, 1)

        week_ms, week_p95 = timed(week, 30)
        results["history_query_ms_with_vms"] = round(week_ms, 2)
        results["history_query_p95_ms_with_vms"] = round(week_p95, 2)

        # Calm first: what the other tenants of a shared host do to its memory cannot count.
        settings.SANDBOX_PRESSURE_MEM_AVAILABLE_MIB = 0
        settings.SANDBOX_PRESSURE_RELEASE_AVAILABLE_MIB = 0
        settings.SANDBOX_PRESSURE_HOLD_S = 0.0
        settings.SANDBOX_PRESSURE_ESCALATE_S = 3600.0
        loop.start()
        loop.ready.wait(30)
        time.sleep(12)  # the first sampling slot and pressure look are behind us
        calm = cpu_window(loop, args.window)
        log(f"calm: {calm:.2f}% of a core")
        loop.dump_profile()
        if Event.objects.filter(type="vm.ballooned").exists():
            raise RuntimeError("ballooned before any pressure: the host is too busy to measure")

        base = available_mib()
        settings.SANDBOX_PRESSURE_MEM_AVAILABLE_MIB = base - args.hog_mib // 2
        settings.SANDBOX_PRESSURE_RELEASE_AVAILABLE_MIB = base - args.hog_mib // 4
        hog = subprocess.Popen(
            [sys.executable, "-c", HOG.format(mib=args.hog_mib)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        threshold = settings.SANDBOX_PRESSURE_MEM_AVAILABLE_MIB
        while available_mib() >= threshold:
            if hog.poll() is not None:
                raise RuntimeError("the hog exited before the threshold was crossed")
            time.sleep(0.01)
        crossed = time.time()
        while not Event.objects.filter(type="vm.ballooned").exists():
            if time.time() - crossed > 60:
                raise RuntimeError("no action within 60 s of the pressure")
            time.sleep(0.05)
        first = Event.objects.filter(type="vm.ballooned").order_by("position").first()
        assert first is not None
        results["pressure_reaction_s"] = round(first.recorded_at.timestamp() - crossed, 2)
        assert hog.stdout is not None
        hog.stdout.readline()  # all of it touched
        low = priorities.count("low")
        while Event.objects.filter(type="vm.ballooned").count() < low:
            time.sleep(0.1)
        results["ballooned"] = Event.objects.filter(type="vm.ballooned").count()
        results["ballooned_priorities"] = sorted(
            {e.payload["priority"] for e in Event.objects.filter(type="vm.ballooned")}
        )
        results["first_action"] = {
            k: first.payload[k] for k in ("reason", "mem_available_mib", "before_mib", "target_mib")
        }
        log(f"reaction {results['pressure_reaction_s']}s; {low} low VMs ballooned")
        pressured = cpu_window(loop, args.window)
        log(f"under pressure: {pressured:.2f}% of a core")

        hog.stdin.close()  # type: ignore[union-attr]
        hog.wait(30)
        gone = time.time()
        while Event.objects.filter(type="vm.balloon_released").count() < low:
            if time.time() - gone > 120:
                raise RuntimeError("the memory did not come back within 120 s")
            time.sleep(0.1)
        last = Event.objects.filter(type="vm.balloon_released").order_by("-position").first()
        assert last is not None
        results["release_s"] = round(last.recorded_at.timestamp() - gone, 2)
        results["loop_cpu_percent"] = round(max(calm, pressured), 3)
        results["loop_cpu_percent_calm"] = round(calm, 3)
        results["loop_cpu_percent_pressure"] = round(pressured, 3)
        results["loop_errors"] = loop.errors[:5]
        results["host_cpus"] = os.cpu_count()
    finally:
        loop.stop.set()
        if loop.is_alive():
            loop.join(10)
        if hog is not None and hog.poll() is None:
            hog.kill()
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
    parser.add_argument("--vms", type=int, default=20)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--hog-mib", type=int, default=3072)
    parser.add_argument("--profile", help="write the calm window's profile here (pstats)")
    args = parser.parse_args()
    run_dir = Path(f"/tmp/sbr-{os.getpid()}")
    data = Path(f"/tmp/sbr-data-{os.getpid()}")
    with throwaway_database("sandbox_bench_resources") as url:
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
