"""Usage history: per-VM samples of CPU, memory, disk and network, kept in three tiers.

- ``UsageSample``: 10 s slots, kept a day. The worker's main process (``core.ticks``) enqueues
  ``vms.tasks.sample_usage`` once per slot while this host runs a VM; the task reads what the
  live metrics read (``vms.metrics_live``: the VMM process's CPU time and resident memory from
  /proc, the driver's disk and NIC counters) and turns the counters into rates against the
  previous sample (``UsageCounter``, kept in the database so any worker process may take the
  next slot).
- ``UsageMinute`` (kept a week) and ``UsageHour`` (kept a year): folded from the finer tier by
  ``vms.tasks.rollup_usage`` (a schedule, every minute) once a slot is complete, with per metric
  the sum, the count and the maximum, so averages and maxima over any range stay exact. The
  same job prunes each tier past its retention, once an hour (never what was not folded yet).

A query (``series``) walks the buckets of ``[from, to)`` at the asked step and takes each bucket
from the coarsest tier whose resolution divides the step and that holds the whole bucket; where
no such tier reaches back that far (older history), from the finest coarser tier, at that tier's
resolution. One SQL query per run of buckets from the same tier, on the primary key
``(vm, ts)``. Roll-ups over several VMs (a user's, a group's, a host's) are the same query over
their VMs, summed per bucket in Python: computed when asked, not stored (see docs/resources.md).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import (
    BigIntegerField,
    Count,
    ExpressionWrapper,
    F,
    FloatField,
    Max,
    QuerySet,
    Sum,
)
from django.db.models.functions import Coalesce

from core.compiled import CompiledQuery, cached
from vms import runtime
from vms.metrics_live import LIVE_STATES, read_proc, sum_counters
from vms.models import (
    UsageCounter,
    UsageHour,
    UsageMinute,
    UsageRollupState,
    UsageSample,
    VirtualMachine,
)

__all__ = [
    "HOUR",
    "METRICS",
    "MINUTE",
    "RAW",
    "STEPS",
    "TIERS",
    "Reading",
    "Segment",
    "Tier",
    "auto_step",
    "fold",
    "plan",
    "prune",
    "rates",
    "rollup",
    "sample_host",
    "series",
    "tick",
]

log = logging.getLogger("sandbox.vms.usage")

# Metric -> unit. cpu: the VMM process's CPU time in % of one core; mem: its resident memory.
METRICS: dict[str, str] = {
    "cpu": "percent of one core",
    "mem": "bytes",
    "disk_read": "bytes/s",
    "disk_write": "bytes/s",
    "net_rx": "bytes/s",
    "net_tx": "bytes/s",
}

SAMPLE_S = 10
# A slot is folded this long after it ended: a sample taken late in its slot still lands.
FOLD_GRACE_S = 30
# A rate needs a previous sample at most this old (a longer gap says nothing of this slot).
MAX_RATE_GAP_S = 3 * SAMPLE_S
DAY = 86_400


@dataclass(frozen=True)
class Tier:
    name: str
    model: Any
    resolution: int  # seconds per row
    retention: int  # seconds kept

    @property
    def raw(self) -> bool:
        return self.model is UsageSample


RAW = Tier("10s", UsageSample, SAMPLE_S, DAY)
MINUTE = Tier("1m", UsageMinute, 60, 7 * DAY)
HOUR = Tier("1h", UsageHour, 3600, 365 * DAY)
TIERS = (RAW, MINUTE, HOUR)  # finest first
FOLDS = ((RAW, MINUTE), (MINUTE, HOUR))  # (from, into)
PRUNED = "pruned"  # the state row of the last pruning (the hour it ran in)

# The steps a query may ask for: each a multiple of every finer tier's resolution, so a bucket
# never splits a row.
STEPS = (10, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, DAY)
MAX_POINTS = 10_000
AUTO_POINTS = 500


# --- Sampling --------------------------------------------------------------------------------


@dataclass
class Reading:
    """What one look at a VM found: cumulative counters (None: not read)."""

    at: float
    pid: int | None = None
    cpu_seconds: float | None = None
    rss_bytes: int | None = None
    counters: dict[str, int] | None = None  # read_bytes, write_bytes, rx_bytes, tx_bytes


def read_vm(vm: VirtualMachine) -> Reading:
    """Read one VM as the live metrics do; the VMM's control socket is left alone while a
    request runs (the worker has it then)."""
    reading = Reading(at=time.time())
    rt = runtime.runtime_dir(vm.pk)
    reading.pid = rt.pid()
    proc = read_proc(reading.pid) if reading.pid else None
    if proc is not None:
        reading.cpu_seconds, reading.rss_bytes = proc
    if not vm.pending_request:
        try:
            reading.counters = sum_counters(runtime.hypervisor().counters(rt))
        except Exception as exc:  # a VMM that does not answer: no disk/net this slot
            log.debug("counters of %s: %s", vm.pk, exc)
    return reading


_COUNTER_FIELDS = {
    "disk_read": ("disk_read_bytes", "read_bytes"),
    "disk_write": ("disk_write_bytes", "write_bytes"),
    "net_rx": ("net_rx_bytes", "rx_bytes"),
    "net_tx": ("net_tx_bytes", "tx_bytes"),
}


def rates(prev: UsageCounter | None, now: Reading) -> dict[str, float | None]:
    """The slot's values from the previous counters and this reading: rates only against a
    recent sample of the same VMM process whose counters did not go down."""
    out: dict[str, float | None] = dict.fromkeys(METRICS)
    out["mem"] = None if now.rss_bytes is None else float(now.rss_bytes)
    if prev is None or now.pid is None or prev.pid != now.pid:
        return out
    dt = now.at - prev.at
    if not 0 < dt <= MAX_RATE_GAP_S:
        return out
    if prev.cpu_seconds is not None and now.cpu_seconds is not None:
        if now.cpu_seconds >= prev.cpu_seconds:
            out["cpu"] = round((now.cpu_seconds - prev.cpu_seconds) / dt * 100.0, 3)
    if now.counters is not None:
        for metric, (column, key) in _COUNTER_FIELDS.items():
            before = getattr(prev, column)
            after = now.counters.get(key)
            if before is not None and after is not None and after >= before:
                out[metric] = round((after - before) / dt, 3)
    return out


def sample_host(slot: int | None = None, vms: Iterable[VirtualMachine] | None = None) -> int:
    """One sample of every live VM of this host in the 10 s slot ``slot`` (epoch seconds; the
    current one by default). Idempotent: a slot already sampled keeps its row. Returns the
    number of rows written."""
    now = time.time()
    slot = int(now // SAMPLE_S * SAMPLE_S) if slot is None else slot // SAMPLE_S * SAMPLE_S
    if vms is None:
        vms = VirtualMachine.objects.filter(state__in=LIVE_STATES, host=runtime.host_name())
    taken = set(UsageSample.objects.filter(ts=slot).values_list("vm_id", flat=True))
    vms = [vm for vm in vms if vm.pk not in taken]
    if not vms:
        return 0
    prev = {c.vm_id: c for c in UsageCounter.objects.filter(vm_id__in=[vm.pk for vm in vms])}
    samples, counters = [], []
    for vm in vms:
        reading = read_vm(vm)
        values = rates(prev.get(vm.pk), reading)
        samples.append(UsageSample(vm_id=vm.pk, ts=slot, **values))
        counters.append(_counter_row(vm.pk, reading))
    with transaction.atomic():
        # A task for the same slot that ran alongside wins; this one's rows are dropped.
        UsageSample.objects.bulk_create(samples, ignore_conflicts=True)
        UsageCounter.objects.bulk_create(
            counters,
            update_conflicts=True,
            unique_fields=["vm"],
            update_fields=[
                "at",
                "pid",
                "cpu_seconds",
                "disk_read_bytes",
                "disk_write_bytes",
                "net_rx_bytes",
                "net_tx_bytes",
            ],
        )
    return len(samples)


def _counter_row(vm_id: Any, reading: Reading) -> UsageCounter:
    row = UsageCounter(vm_id=vm_id, at=reading.at, pid=reading.pid, cpu_seconds=reading.cpu_seconds)
    # Counters not read this slot stay None, so the next slot takes no rate from a stale base.
    if reading.counters is not None:
        for column, key in _COUNTER_FIELDS.values():
            setattr(row, column, reading.counters.get(key))
    return row


_last_slot: int | None = None


def tick(now: datetime) -> None:
    """``core.ticks``: once per 10 s slot, enqueue the sampling task while this host runs a VM."""
    global _last_slot
    slot = int(now.timestamp()) // SAMPLE_S * SAMPLE_S
    if slot == _last_slot:
        return
    _last_slot = slot
    if not VirtualMachine.objects.filter(state__in=LIVE_STATES, host=runtime.host_name()).exists():
        return
    from django_q.tasks import async_task

    async_task(
        "vms.tasks.sample_usage", slot, task_name="usage-sample", save=False, timeout=SAMPLE_S * 2
    )


def sample_task(slot: int) -> int:
    """The task: a slot taken too late says nothing of its time and is skipped."""
    if time.time() - slot > 3 * SAMPLE_S:
        log.info("usage slot %s skipped: taken %.0fs late", slot, time.time() - slot)
        return 0
    return sample_host(slot)


# --- Folding and pruning ----------------------------------------------------------------------


def _aggregates(src: Tier) -> dict[str, Any]:
    aggs: dict[str, Any] = {}
    for m in METRICS:
        if src.raw:
            aggs[f"{m}_sum"] = Coalesce(Sum(m), 0.0, output_field=FloatField())
            aggs[f"{m}_count"] = Count(m)
            aggs[f"{m}_max"] = Max(m)
        else:
            aggs[f"{m}_sum"] = Coalesce(Sum(f"{m}_sum"), 0.0, output_field=FloatField())
            aggs[f"{m}_count"] = Coalesce(Sum(f"{m}_count"), 0)
            aggs[f"{m}_max"] = Max(f"{m}_max")
    return aggs


def _bucket(width: int) -> Any:
    # Integer division on both databases (bigint / int on PostgreSQL, INTEGER / INTEGER on
    # SQLite); ts is never negative.
    return ExpressionWrapper(F("ts") / width * width, output_field=BigIntegerField())


def fold(src: Tier, dst: Tier, now: float | None = None, max_slots: int = 1440) -> int:
    """Fold the complete slots of ``src`` into ``dst`` from where the last fold stopped (at most
    ``max_slots`` of ``dst`` per call); returns the rows written."""
    now = time.time() if now is None else now
    res = dst.resolution
    with transaction.atomic():
        state = UsageRollupState.objects.select_for_update().filter(tier=dst.name).first()
        if src.raw:
            ready = int((now - FOLD_GRACE_S) // res * res)
        else:
            src_until = (
                UsageRollupState.objects.filter(tier=src.name)
                .values_list("until", flat=True)
                .first()
            )
            if src_until is None:
                return 0
            ready = src_until // res * res
        if state is None:
            oldest = src.model.objects.order_by("ts").values_list("ts", flat=True).first()
            start = ready if oldest is None else oldest // res * res
            state = UsageRollupState.objects.create(tier=dst.name, until=start)
        start = state.until
        end = min(ready, start + max_slots * res)
        if end <= start:
            return 0
        rows = (
            src.model.objects.filter(ts__gte=start, ts__lt=end)
            .annotate(bucket=_bucket(res))
            .values("vm_id", "bucket")
            .annotate(**_aggregates(src))
            .order_by()
        )
        out = []
        for row in rows:
            row["ts"] = row.pop("bucket")
            out.append(dst.model(**row))
        dst.model.objects.bulk_create(out, ignore_conflicts=True, batch_size=1000)
        state.until = end
        state.save(update_fields=["until"])
    return len(out)


def prune(now: float | None = None) -> dict[str, int]:
    """Delete each tier's rows past its retention, never one its coarser tier has not folded."""
    now = time.time() if now is None else now
    until = dict(UsageRollupState.objects.values_list("tier", "until"))
    deleted = {}
    for tier in TIERS:
        horizon = int(now - tier.retention)
        coarser = {RAW.name: MINUTE.name, MINUTE.name: HOUR.name}.get(tier.name)
        if coarser is not None:
            horizon = min(horizon, until.get(coarser, 0))
        deleted[tier.name], _ = tier.model.objects.filter(ts__lt=horizon).delete()
    return deleted


def rollup(now: float | None = None) -> dict[str, int]:
    """The scheduled job: fold every tier up to date (several calls' worth after a long stop),
    then prune."""
    now = time.time() if now is None else now
    out: dict[str, int] = {}
    for src, dst in FOLDS:
        total = 0
        for _ in range(400):  # bounded: a year of hours is 7 calls, a week of minutes 7
            written = fold(src, dst, now)
            total += written
            state = UsageRollupState.objects.filter(tier=dst.name).first()
            if state is None or written == 0 and not _behind(src, dst, state.until, now):
                break
        out[dst.name] = total
    # Pruning scans each tier (no index on the time alone): once an hour is enough, a tier
    # then keeps at most an hour more than its retention.
    hour = int(now) // 3600 * 3600
    if not UsageRollupState.objects.filter(tier=PRUNED, until__gte=hour).exists():
        out.update({f"pruned_{k}": v for k, v in prune(now).items()})
        UsageRollupState.objects.update_or_create(tier=PRUNED, defaults={"until": hour})
    return out


def _behind(src: Tier, dst: Tier, until: int, now: float) -> bool:
    if src.raw:
        return until + dst.resolution <= now - FOLD_GRACE_S
    src_until = UsageRollupState.objects.filter(tier=src.name).values_list("until", flat=True)
    return bool(src_until) and until + dst.resolution <= src_until[0]


# --- Queries ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """A run of buckets ``[start, end)`` of ``width`` seconds, read from ``tier``."""

    tier: Tier
    start: int
    end: int
    width: int


def auto_step(start: int, end: int) -> int:
    """The smallest step that answers ``[start, end)`` in at most AUTO_POINTS points."""
    for step in STEPS:
        if math.ceil((end - start) / step) <= AUTO_POINTS:
            return step
    return STEPS[-1]


def coverage(now: float) -> dict[str, tuple[int, float]]:
    """Per tier, the range of slots it holds whole: from its retention horizon to where it has
    been folded (the fine tier: up to now and on)."""
    until = dict(UsageRollupState.objects.values_list("tier", "until"))
    out: dict[str, tuple[int, float]] = {}
    for tier in TIERS:
        lo = math.ceil((now - tier.retention) / tier.resolution) * tier.resolution
        hi: float = math.inf if tier.raw else until.get(tier.name, lo)
        out[tier.name] = (lo, hi)
    return out


def plan(start: int, end: int, step: int, cover: dict[str, tuple[int, float]]) -> list[Segment]:
    """Which tier answers which buckets of ``[start, end)`` (``step`` one of STEPS)."""
    fine = [t for t in reversed(TIERS) if t.resolution <= step]  # coarsest first
    coarse = [t for t in TIERS if t.resolution > step]  # finest first
    buckets: list[tuple[Tier, int, int]] = []  # (tier, bucket start, width)
    t = start // step * step
    while t < end:
        chosen: tuple[Tier, int, int] | None = None
        for tier in fine:
            lo, hi = cover[tier.name]
            if lo <= t and t + step <= hi:
                chosen = (tier, t, step)
                break
        if chosen is None:
            for tier in coarse:
                w = tier.resolution
                b = t // w * w
                lo, hi = cover[tier.name]
                answered_to = buckets[-1][1] + buckets[-1][2] if buckets else -1
                if lo <= b and b + w <= hi and b >= answered_to:
                    chosen = (tier, b, w)
                    break
        if chosen is None:
            t += step
            continue
        buckets.append(chosen)
        t = chosen[1] + chosen[2]
    segments: list[Segment] = []
    for tier, b, w in buckets:
        last = segments[-1] if segments else None
        if last is not None and last.tier is tier and last.width == w and last.end == b:
            segments[-1] = Segment(tier, last.start, b + w, w)
        else:
            segments.append(Segment(tier, b, b + w, w))
    return segments


@dataclass
class _Acc:
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    maxes: dict[str, float] = field(default_factory=dict)


def _bucketed(qs: QuerySet[Any], tier: Tier, width: int) -> QuerySet[Any]:
    bucket = F("ts") if width == tier.resolution else _bucket(width)
    return (
        qs.annotate(bucket=bucket)
        .values("vm_id", "bucket")
        .annotate(**_aggregates(tier))
        .order_by()
    )


# Stand-ins compiled into the one-VM query's SQL where a request's values go (core.compiled).
_VM_STAND_IN = uuid.UUID("5a4d0000-0000-4000-8000-00005a3a9e00")
_START_STAND_IN, _END_STAND_IN = -7_319_446_591, -7_319_446_592


@cached
def _one_vm_query(tier_name: str, width: int) -> CompiledQuery:
    """One VM's buckets of one tier: compiled once per (tier, width); a VM's page asks it at
    every range pick, and Django's compiling of 18 aggregates cost more than the database."""
    tier = next(t for t in TIERS if t.name == tier_name)
    qs = tier.model.objects.filter(
        vm_id=_VM_STAND_IN, ts__gte=_START_STAND_IN, ts__lt=_END_STAND_IN
    )
    return CompiledQuery(
        _bucketed(qs, tier, width),
        {"vm": _VM_STAND_IN, "start": _START_STAND_IN, "end": _END_STAND_IN},
    )


def _fetch(seg: Segment, vm_ids: Sequence[Any]) -> list[dict[str, Any]]:
    if len(vm_ids) == 1:
        query = _one_vm_query(seg.tier.name, seg.width)
        return query.run(vm=uuid.UUID(str(vm_ids[0])), start=seg.start, end=seg.end)
    qs = seg.tier.model.objects.filter(vm_id__in=vm_ids, ts__gte=seg.start, ts__lt=seg.end)
    return list(_bucketed(qs, seg.tier, seg.width))


def series(
    vm_ids: Sequence[Any],
    start: int,
    end: int,
    step: int,
    *,
    rollup: bool = False,
    now: float | None = None,
) -> dict[str, Any]:
    """The usage of ``vm_ids`` over ``[start, end)`` at ``step``: points of each bucket that
    has samples, oldest first, each with per metric ``avg`` and ``max``.

    One VM (``rollup`` false): ``avg`` is the mean of its samples in the bucket, ``max`` their
    maximum. Several (``rollup``): ``avg`` is the total over the VMs averaged over the whole
    bucket (a VM not running counts as 0), ``max`` the sum of each VM's maximum (no more than
    that was ever used at once)."""
    now = time.time() if now is None else now
    segments = plan(start, end, step, coverage(now))
    points: list[dict[str, Any]] = []
    for seg in segments:
        per_bucket: dict[int, list[dict[str, Any]]] = {}
        if vm_ids:
            for row in _fetch(seg, vm_ids):
                per_bucket.setdefault(row["bucket"], []).append(row)
        for b in sorted(per_bucket):
            points.append(_point(b, seg, per_bucket[b], rollup=rollup, now=now))
    return {
        "segments": [
            {"tier": s.tier.name, "from": s.start, "to": s.end, "step": s.width} for s in segments
        ],
        "points": points,
    }


def _point(
    b: int, seg: Segment, rows: list[dict[str, Any]], *, rollup: bool, now: float
) -> dict[str, Any]:
    point: dict[str, Any] = {"ts": b, "step": seg.width, "tier": seg.tier.name}
    # The samples the bucket could hold (the one still running: up to now).
    slots = max(1, math.ceil((min(b + seg.width, now) - b) / SAMPLE_S))
    for m in METRICS:
        total = sum(r[f"{m}_sum"] for r in rows)
        count = sum(r[f"{m}_count"] for r in rows)
        maxes = [r[f"{m}_max"] for r in rows if r[f"{m}_max"] is not None]
        if count == 0:
            point[m] = None
        elif rollup:
            point[m] = {"avg": round(total / slots, 3), "max": round(sum(maxes), 3)}
        else:
            point[m] = {"avg": round(total / count, 3), "max": round(max(maxes), 3)}
    return point
