"""One VM's usage history query on PostgreSQL, with a year of synthetic history in the tiers.

    python bench/usage_query.py [--vms 1] [--repeat 30]

Creates a throwaway database on the PostgreSQL of DATABASE_URL (default the local server),
migrates it, and fills the usage tiers as a year of sampling leaves them for each of --vms VMs
(the last day as 10 s samples, the last week as 1 min rows, the year as 1 h rows: 27,480 rows per
VM), with COPY. Then it times ``vms.usage.series`` (the planner, one SQL query per tier run,
the points) for the first VM, --repeat times each after a warm-up:
- ``history_query_ms``: the last 7 days at the automatic step (30 min: 336 points, from the
  minute tier and the raw tail), the median;
- ``day_query_ms`` (24 h at 5 min) and ``year_query_ms`` (365 days at 1 d, from the hour tier);
- ``prune_ms``: the job's pruning of every tier at steady state (nothing to delete: the scans);
- the tiers' table and index sizes (``*_bytes``), and the plan of the week's minute query
  (an index scan on the primary key, ``week_plan``).
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.event_store import throwaway_database  # noqa: E402

DAY = 86_400


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    with throwaway_database("sandbox_bench_usage") as url:
        os.environ["DATABASE_URL"] = url
        os.environ.setdefault("SANDBOX_DATA_DIR", str(ROOT / "var" / "bench"))
        os.environ["DJANGO_SETTINGS_MODULE"] = "sandbox_site.settings"
        os.environ["SANDBOX_LOG_LEVEL"] = "WARNING"
        results = run(args)
    print(json.dumps(results))


def _copy(cur: object, table: str, columns: list[str], rows: io.StringIO) -> None:
    rows.seek(0)
    with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:  # type: ignore[attr-defined]
        while chunk := rows.read(1 << 20):
            copy.write(chunk)


def fill(vm_ids: list[uuid.UUID], now: int) -> dict[str, int]:
    """The tiers as a year of sampling leaves them at ``now``; returns rows per tier."""
    from django.db import connection

    from vms import usage
    from vms.models import UsageRollupState

    metrics = list(usage.METRICS)
    minute_until = (now - usage.FOLD_GRACE_S) // 60 * 60
    hour_until = minute_until // 3600 * 3600
    counts = {"10s": 0, "1m": 0, "1h": 0}
    rollup_cols = ["vm_id", "ts"] + [f"{m}_{k}" for m in metrics for k in ("sum", "count", "max")]
    with connection.cursor() as django_cur:
        cur = django_cur.cursor  # psycopg's own, for COPY
        for n, vm_id in enumerate(vm_ids):
            raw, minutes, hours = io.StringIO(), io.StringIO(), io.StringIO()
            for ts in range((now - DAY) // 10 * 10, now // 10 * 10, 10):
                v = _values(ts, n)
                raw.write(f"{vm_id}\t{ts}\t" + "\t".join(f"{x:.3f}" for x in v) + "\n")
                counts["10s"] += 1
            for ts in range((now - 7 * DAY) // 60 * 60, minute_until, 60):
                minutes.write(_rollup_line(vm_id, ts, _values(ts, n), 6))
                counts["1m"] += 1
            for ts in range((now - 365 * DAY) // 3600 * 3600, hour_until, 3600):
                hours.write(_rollup_line(vm_id, ts, _values(ts, n), 360))
                counts["1h"] += 1
            _copy(cur, "vms_usagesample", ["vm_id", "ts", *metrics], raw)
            _copy(cur, "vms_usageminute", rollup_cols, minutes)
            _copy(cur, "vms_usagehour", rollup_cols, hours)
        UsageRollupState.objects.update_or_create(tier="1m", defaults={"until": minute_until})
        UsageRollupState.objects.update_or_create(tier="1h", defaults={"until": hour_until})
        for table in ("vms_usagesample", "vms_usageminute", "vms_usagehour"):
            django_cur.execute(f"VACUUM ANALYZE {table}")
    return counts


def _values(ts: int, n: int) -> list[float]:
    # A daily wave per VM: CPU %, RSS, disk read/write, net rx/tx.
    phase = ((ts // 600) + n * 7) % 144
    cpu = 5.0 + phase * 0.6
    return [cpu, 3.0e8 + phase * 1e6, phase * 1e4, phase * 2e4, phase * 5e3, phase * 3e3]


def _rollup_line(vm_id: uuid.UUID, ts: int, values: list[float], count: int) -> str:
    cols = []
    for v in values:
        cols += [f"{v * count:.3f}", str(count), f"{v * 1.5:.3f}"]
    return f"{vm_id}\t{ts}\t" + "\t".join(cols) + "\n"


def timed(fn: object, repeat: int) -> tuple[float, float]:
    fn()  # type: ignore[operator]  # warm-up: plans, caches
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.95))]


def run(args: argparse.Namespace) -> dict[str, object]:
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from accounts import commands as account_commands
    from accounts.caller import Caller
    from audit.actor import Actor
    from vms import commands, usage

    call_command("migrate", verbosity=0)
    user = account_commands.create_user(
        Actor.system(channel="shell", name="bench"),
        username="bench",
        password="bench-Password-1",
        role="operator",
    )
    caller = Caller.for_user(user, channel="shell")
    # As many VMs as asked (the quota of one operator may be lower: raised for the bench).
    from vms.models import Quota

    n = args.vms + 1
    Quota.objects.update_or_create(
        user=user,
        defaults={
            "max_vms": n,
            "max_vcpus": 8 * n,
            "max_memory_mib": 8192 * n,
            "max_disk_mib": 8192 * n,
        },
    )
    vm_ids = [
        commands.create(caller, name=f"bench-{i}", template="linux-small", start_now=False).vm.pk
        for i in range(args.vms)
    ]
    now = int(time.time())
    t0 = time.perf_counter()
    counts = fill(vm_ids, now)
    fill_s = time.perf_counter() - t0
    one = [vm_ids[0]]

    def week() -> dict[str, object]:
        start = now - 7 * DAY
        return usage.series(one, start, now, usage.auto_step(start, now), now=now)

    body = week()
    assert len(body["points"]) >= 300, len(body["points"])  # type: ignore[arg-type]
    week_ms, week_p95 = timed(week, args.repeat)
    day_ms, _ = timed(lambda: usage.series(one, now - DAY, now, 300, now=now), args.repeat)
    year_ms, _ = timed(
        lambda: usage.series(one, now - 365 * DAY + 3600, now, DAY, now=now), args.repeat
    )
    # The minute job's pruning at steady state (each tier scanned for rows past its retention).
    prune_ms, _ = timed(lambda: usage.prune(now), 5)
    with connection.cursor() as cur:
        cur.execute(
            "EXPLAIN SELECT vm_id, ts / 1800 * 1800 AS b, SUM(cpu_sum) FROM vms_usageminute "
            "WHERE vm_id = %s AND ts >= %s AND ts < %s GROUP BY 1, 2",
            [vm_ids[0], now - 7 * DAY, now],
        )
        plan = " / ".join(row[0].strip() for row in cur.fetchall())
        sizes = {}
        for tier, table in (("raw", "vms_usagesample"), ("minute", "vms_usageminute"),
                            ("hour", "vms_usagehour")):  # fmt: skip
            cur.execute("SELECT pg_table_size(%s), pg_indexes_size(%s)", [table, table])
            sizes[f"{tier}_table_bytes"], sizes[f"{tier}_index_bytes"] = cur.fetchone()
    total = sum(sizes.values())
    return {
        "vms": args.vms,
        "rows": counts,
        "fill_s": round(fill_s, 1),
        "week_points": len(body["points"]),  # type: ignore[arg-type]
        "week_segments": body["segments"],
        "week_plan": plan,
        "history_query_ms": round(week_ms, 2),
        "history_query_p95_ms": round(week_p95, 2),
        "day_query_ms": round(day_ms, 2),
        "year_query_ms": round(year_ms, 2),
        "prune_ms": round(prune_ms, 2),
        **sizes,
        "total_bytes": total,
        "bytes_per_vm_year": total // args.vms,
    }


if __name__ == "__main__":
    main()
