"""Event store throughput on PostgreSQL, against a raw psycopg baseline measured in the same run.

    python bench/event_store.py [--singles 2000] [--batched 50000] [--batch-size 100]

Creates a throwaway database on the PostgreSQL of DATABASE_URL (default the local server; it is
started if it is not running), migrates it, measures, and drops it. Measures:
- raw: one INSERT per transaction under the same EXCLUSIVE table lock, head read and SHA-256 chain
  hash as the product, with psycopg directly (durability unchanged: synchronous commit);
- single: the product's append path (``audit.store.append`` with an expected version, in a
  command's transaction), interleaved with raw in rounds so both see the same machine noise;
- command: single appends whose inline projection (login state) is updated in the transaction,
  interleaved with the other two; ``command_vs_append_ratio`` is its rate over the product's
  plain single appends (no projection), ``command_vs_raw_ratio`` over the raw appends;
- batched: ``append_many`` of --batch-size events per transaction;
- rebuild: every projection replayed from position 0;
- verify: the whole chain and digests verified.
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse, urlunparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def ensure_postgres(url: str) -> None:
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", str(parsed.port or 5432)
    if subprocess.run(["pg_isready", "-h", host, "-p", port, "-q"], check=False).returncode == 0:
        return
    if host in {"127.0.0.1", "localhost"} and Path("/etc/postgresql").is_dir():
        version = sorted(os.listdir("/etc/postgresql"))[-1]
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=False
        )
        for _ in range(30):
            if (
                subprocess.run(["pg_isready", "-h", host, "-p", port, "-q"], check=False).returncode
                == 0
            ):
                return
            time.sleep(1)
    raise SystemExit(f"PostgreSQL is not reachable at {host}:{port}")


@contextlib.contextmanager
def throwaway_database(prefix: str) -> Iterator[str]:
    """A new PostgreSQL database on DATABASE_URL's server (else the local one), started if
    needed; yields its URL and drops it afterwards (closing this process's connections)."""
    import psycopg

    base_url = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    ensure_postgres(base_url)
    parsed = urlparse(base_url)
    db_name = f"{prefix}_{os.getpid()}"
    admin_url = urlunparse(parsed._replace(path="/postgres"))
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db_name}"')
    try:
        yield urlunparse(parsed._replace(path=f"/{db_name}"))
    finally:
        if "django" in sys.modules:
            from django.db import connections

            connections.close_all()
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--singles", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batched", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()

    with throwaway_database("sandbox_bench") as bench_url:
        os.environ["DATABASE_URL"] = bench_url
        os.environ.setdefault("SANDBOX_DATA_DIR", str(ROOT / "var" / "bench"))
        os.environ["DJANGO_SETTINGS_MODULE"] = "sandbox_site.settings"
        os.environ["SANDBOX_LOG_LEVEL"] = "WARNING"
        results = run(args, bench_url)
    print(json.dumps(results))


def run(args: argparse.Namespace, url: str) -> dict[str, float | int]:
    import django

    django.setup()
    import psycopg
    from django.core.management import call_command
    from django.db import transaction

    from audit import projections, store
    from audit.actor import Actor
    from audit.hashing import canonical_json
    from audit.integrity import verify_store

    call_command("migrate", verbosity=0)
    actor = Actor.system(channel="system", name="bench")

    raw = psycopg.connect(url)
    raw.execute(
        "CREATE TABLE raw_event (LIKE audit_event INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)"
    )
    raw.commit()

    def raw_insert(i: int) -> None:
        # What a hand-written appender does: the same lock, head read, canonical hash and the
        # same full row, every value bound as a parameter; no ORM, no projections, no checks.
        with raw.transaction():
            # The store's lock kind (a transaction-level advisory lock), under a key of its own.
            raw.execute("SET LOCAL lock_timeout = '5000ms'; SELECT pg_advisory_xact_lock(1)")
            row = raw.execute(
                "SELECT position, hash FROM raw_event ORDER BY position DESC LIMIT 1"
            ).fetchone()
            position, prev = (row[0], row[1]) if row else (0, "0" * 64)
            data = canonical_json({"i": i, "role": "operator"})
            now = datetime.now(UTC)
            event_id = uuid.uuid4()
            fields = [
                str(event_id),
                "user",
                f"r{i}",
                1,
                "user.role_changed",
                1,
                "system",
                "",
                "bench",
                "",
                "system",
                "",
                "",
                "c",
                "",
                now.isoformat(),
            ]
            header = json.dumps(fields, separators=(",", ":"))
            digest = hashlib.sha256(f"{prev}\n{header}\n{data}".encode()).hexdigest()
            raw.execute(
                "INSERT INTO raw_event (position, event_id, aggregate_type, aggregate_id, version, type, schema_version,"
                " data, actor_type, actor_id, actor_name, token_id, channel, source_ip, request_id, correlation_id,"
                " causation_id, recorded_at, prev_hash, hash) VALUES"
                " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    position + 1,
                    event_id,
                    "user",
                    f"r{i}",
                    1,
                    "user.role_changed",
                    1,
                    data,
                    "system",
                    "",
                    "bench",
                    "",
                    "system",
                    "",
                    "",
                    "c",
                    "",
                    now,
                    prev,
                    digest,
                ],
            )

    def product_insert(i: int) -> None:
        with transaction.atomic():  # a command's transaction
            store.append(
                "user",
                f"p{i}",
                "user.role_changed",
                {"i": i, "role": "operator"},
                actor=actor,
                expected_version=0,
            )

    def command_insert(i: int) -> None:
        with transaction.atomic():
            store.append(
                "account",
                f"c{i % 50}",
                "auth.login_failed",
                {"reason": "bad_credentials"},
                actor=actor,
            )

    # Warm up both paths (connections, prepared plans, imports).
    for i in range(50):
        raw_insert(-i - 1)
        product_insert(-i - 1)
        command_insert(i)

    per_round = max(1, args.singles // args.rounds)
    raw_rates, single_rates, command_rates = [], [], []
    counter = 0
    for _ in range(args.rounds):
        for rates, fn in (
            (raw_rates, raw_insert),
            (single_rates, product_insert),
            (command_rates, command_insert),
        ):
            started = time.perf_counter()
            for i in range(counter, counter + per_round):
                fn(i)
            rates.append(per_round / (time.perf_counter() - started))
        counter += per_round
    raw.close()

    batches = args.batched // args.batch_size
    started = time.perf_counter()
    for b in range(batches):
        store.append_many(
            [
                store.PendingEvent("user", f"b{b}", "user.role_changed", {"i": i, "role": "viewer"})
                for i in range(args.batch_size)
            ],
            actor=actor,
        )
    batched_s = time.perf_counter() - started
    batched_events = batches * args.batch_size

    projections.run_pending(max_batches=10_000)
    started = time.perf_counter()
    rebuilt = sum(projections.rebuild(name) for name in projections.registry())
    rebuild_s = time.perf_counter() - started

    started = time.perf_counter()
    report = verify_store()
    verify_s = time.perf_counter() - started
    if not report.ok:
        raise SystemExit(f"chain verification failed: {report.problem}")

    raw_rate = statistics.median(raw_rates)
    single_rate = statistics.median(single_rates)
    command_rate = statistics.median(command_rates)
    result = {
        "raw_single_per_s": round(raw_rate, 1),
        "single_appends_per_s": round(single_rate, 1),
        "append_ratio_vs_raw": round(single_rate / raw_rate, 3),
        "command_with_inline_projection_per_s": round(command_rate, 1),
        "command_vs_append_ratio": round(command_rate / single_rate, 3),
        "command_vs_raw_ratio": round(command_rate / raw_rate, 3),
        "batched_events_per_s": round(batched_events / batched_s, 1),
        "batch_size": args.batch_size,
        "rebuild_events_per_s": round(rebuilt / rebuild_s, 1),
        "rebuild_events": rebuilt,
        "verify_events_per_s": round(report.checked / verify_s, 1),
        "verify_events": report.checked,
        "rounds": args.rounds,
        "singles_per_round": per_round,
    }
    print(
        f"raw {raw_rate:.0f}/s, product {single_rate:.0f}/s (ratio {result['append_ratio_vs_raw']}), "
        f"command {command_rate:.0f}/s (vs append {result['command_vs_append_ratio']}), "
        f"batched {result['batched_events_per_s']:.0f} ev/s, rebuild {result['rebuild_events_per_s']:.0f} ev/s, "
        f"verify {result['verify_events_per_s']:.0f} ev/s",
        file=sys.stderr,
    )
    return result


if __name__ == "__main__":
    main()
