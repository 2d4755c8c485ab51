"""Usage history (``vms.usage``): folding keeps sums, counts and maxima exact; pruning never
drops what was not folded; a query over a range that spans the tiers takes each bucket from the
right one and answers merged points; the API validates its input and answers only what the
caller may see (``vms.policy``)."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from rest_framework.test import APIClient

from vms import commands, usage
from vms.models import (
    UsageCounter,
    UsageHour,
    UsageMinute,
    UsageRollupState,
    UsageSample,
    VirtualMachine,
)
from vms.task_guard import ALLOWED_TASKS

pytestmark = pytest.mark.django_db

HOUR = 3600


def running_vm(caller: Any, name: str, host: str = "host-a") -> VirtualMachine:
    accepted = commands.create(caller, name=name, template="linux-small")
    commands.record_outcome(accepted.request, "vm.started", {"host": host, "hypervisor": "qemu"})
    return VirtualMachine.objects.get(pk=accepted.vm.pk)


@pytest.fixture
def owner(caller_for: Any, vm_dirs: Any) -> Any:
    return caller_for("operator")


def raw(vm: VirtualMachine, start: int, end: int, **values: Any) -> None:
    """A raw sample every 10 s in [start, end); a value may be a function of the slot."""
    rows = []
    for ts in range(start, end, usage.SAMPLE_S):
        v = {k: (f(ts) if callable(f) else f) for k, f in values.items()}
        rows.append(UsageSample(vm_id=vm.pk, ts=ts, **v))
    UsageSample.objects.bulk_create(rows, batch_size=2000)


# --- Folding -----------------------------------------------------------------------------------


def test_folding_keeps_sums_counts_and_maxima_exact(owner: Any) -> None:
    vm = running_vm(owner, "fold")
    base = 1_700_000_000 // HOUR * HOUR
    # Two hours of samples: cpu rises by slot; mem missing in every third slot (a null is not a
    # zero); one spike of disk writes.
    raw(
        vm,
        base,
        base + 2 * HOUR,
        cpu=lambda ts: float((ts - base) // 10 % 97),
        mem=lambda ts: None if (ts // 10) % 3 == 0 else 1000.0 + (ts - base),
        disk_write=lambda ts: 5e6 if ts == base + 1230 else 1.0,
    )
    samples = list(UsageSample.objects.filter(vm=vm).values("ts", "cpu", "mem", "disk_write"))
    usage.rollup(now=base + 2 * HOUR + usage.FOLD_GRACE_S + 1)

    minutes = list(UsageMinute.objects.filter(vm=vm).order_by("ts").values())
    assert len(minutes) == 120
    for m in minutes:
        inside = [s for s in samples if m["ts"] <= s["ts"] < m["ts"] + 60]
        mems = [s["mem"] for s in inside if s["mem"] is not None]
        assert m["cpu_sum"] == sum(s["cpu"] for s in inside)
        assert m["cpu_count"] == 6 and m["cpu_max"] == max(s["cpu"] for s in inside)
        assert (m["mem_sum"], m["mem_count"], m["mem_max"]) == (sum(mems), len(mems), max(mems))
        assert m["net_rx_count"] == 0 and m["net_rx_max"] is None
    hours = list(UsageHour.objects.filter(vm=vm).order_by("ts").values())
    assert [h["ts"] for h in hours] == [base, base + HOUR]
    for h in hours:
        inside = [s for s in samples if h["ts"] <= s["ts"] < h["ts"] + HOUR]
        mems = [s["mem"] for s in inside if s["mem"] is not None]
        assert h["cpu_sum"] == sum(s["cpu"] for s in inside) and h["cpu_count"] == 360
        assert h["mem_sum"] == sum(mems) and h["mem_count"] == len(mems) == 240
        assert h["mem_max"] == max(mems)
        assert h["disk_write_max"] == max(s["disk_write"] for s in inside)
    # The spike survives two folds as a maximum, and the hour's average is the samples' mean.
    assert hours[0]["disk_write_max"] == 5e6
    assert hours[1]["mem_sum"] / hours[1]["mem_count"] == pytest.approx(
        sum(s["mem"] for s in samples if s["ts"] >= base + HOUR and s["mem"] is not None) / 240
    )


def test_a_slot_is_folded_once_and_only_when_complete(owner: Any) -> None:
    vm = running_vm(owner, "once")
    base = 1_700_000_000 // HOUR * HOUR
    raw(vm, base, base + 90, cpu=10.0)
    usage.rollup(now=base + 60 + usage.FOLD_GRACE_S - 1)  # minute 0 not complete with grace
    assert not UsageMinute.objects.exists()
    usage.rollup(now=base + 60 + usage.FOLD_GRACE_S)
    usage.rollup(now=base + 60 + usage.FOLD_GRACE_S + 5)  # again: nothing twice
    assert list(UsageMinute.objects.values_list("ts", "cpu_count")) == [(base, 6)]
    assert UsageRollupState.objects.get(tier="1m").until == base + 60
    assert not UsageHour.objects.exists()  # the hour is not complete


def test_pruning_keeps_what_was_not_folded(owner: Any) -> None:
    vm = running_vm(owner, "prune")
    now = 1_700_000_000 // HOUR * HOUR
    old = now - 2 * usage.DAY
    raw(vm, old, old + 600, cpu=1.0)
    UsageRollupState.objects.create(tier="1m", until=old)  # the fold has not got there
    usage.prune(now=now)
    assert UsageSample.objects.count() == 60
    usage.rollup(now=now)
    assert UsageSample.objects.count() == 0  # folded, then past the day
    assert UsageMinute.objects.filter(vm=vm).count() == 10
    # Its hour is whole (minutes after the samples count as none), so it is folded too.
    assert list(UsageHour.objects.filter(vm=vm).values_list("cpu_sum", "cpu_count")) == [(60.0, 60)]


# --- Rates from counters ----------------------------------------------------------------------


def test_rates_come_only_from_a_recent_sample_of_the_same_vmm(owner: Any) -> None:
    vm = running_vm(owner, "rates")
    prev = UsageCounter(
        vm=vm, at=100.0, pid=7, cpu_seconds=10.0, disk_read_bytes=1000, net_rx_bytes=500
    )
    counters = {"read_bytes": 6000, "write_bytes": 0, "rx_bytes": 400, "tx_bytes": 10}
    r = usage.Reading(at=110.0, pid=7, cpu_seconds=15.0, rss_bytes=4096, counters=counters)
    out = usage.rates(prev, r)
    assert out["cpu"] == 50.0 and out["mem"] == 4096.0 and out["disk_read"] == 500.0
    assert out["net_rx"] is None  # the counter went down: reset, no rate
    assert out["disk_write"] is None  # no previous value
    assert usage.rates(prev, usage.Reading(at=110.0, pid=8, cpu_seconds=15.0))["cpu"] is None
    late = usage.Reading(at=100.0 + usage.MAX_RATE_GAP_S + 1, pid=7, cpu_seconds=15.0)
    assert usage.rates(prev, late)["cpu"] is None


def test_the_sampler_reads_the_vmm_process_as_the_live_metrics_do(owner: Any) -> None:
    """The metrics source the live stream uses, on real processes standing in for two VMMs, one
    busy and one asleep (no control socket: disk and network stay null, CPU and memory come
    from /proc)."""
    import subprocess
    import sys

    from vms import runtime

    busy_vm = running_vm(owner, "busy", host=runtime.host_name())
    idle_vm = running_vm(owner, "idle", host=runtime.host_name())
    burn = "import time\nt=time.time()\nwhile time.time()-t<30: pass"
    procs = {
        busy_vm.pk: subprocess.Popen([sys.executable, "-c", burn]),  # noqa: S603
        idle_vm.pk: subprocess.Popen(["sleep", "30"]),  # noqa: S607
    }
    rts = [runtime.runtime_dir(pk) for pk in procs]
    try:
        for rt, proc in zip(rts, procs.values(), strict=True):
            rt.create()
            rt.pidfile.write_text(str(proc.pid))
        slot = int(time.time()) // 10 * 10
        assert usage.sample_host(slot) == 2
        time.sleep(2)
        assert usage.sample_host(slot) == 0  # the slot is taken: idempotent
        assert usage.sample_host(slot + 10) == 2
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
        for rt in rts:
            rt.pidfile.unlink()
    first, busy = UsageSample.objects.filter(vm=busy_vm).order_by("ts")
    _, idle = UsageSample.objects.filter(vm=idle_vm).order_by("ts")
    assert first.cpu is None  # no previous sample
    # A busy loop uses up to one core (less on a loaded machine); a sleeper next to nothing.
    assert busy.cpu is not None and 10 < busy.cpu < 110, busy.cpu
    assert idle.cpu is not None and idle.cpu < 2, idle.cpu
    assert busy.mem is not None and busy.mem > 1_000_000
    assert busy.disk_read is None and busy.net_rx is None
    assert UsageCounter.objects.get(vm=busy_vm).pid == procs[busy_vm.pk].pid


def test_the_tick_enqueues_one_sample_per_slot_while_the_host_runs_a_vm(
    owner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime

    from django_q import tasks

    from vms import runtime

    asked: list[tuple[Any, ...]] = []
    monkeypatch.setattr(tasks, "async_task", lambda *a, **k: asked.append((*a, k["timeout"])))
    monkeypatch.setattr(usage, "_last_slot", None)
    at = datetime.fromtimestamp(1_800_000_003, UTC)
    usage.tick(at)
    assert asked == []  # no VM runs here
    monkeypatch.setattr(usage, "_last_slot", None)
    running_vm(owner, "ticked", host=runtime.host_name())
    usage.tick(at)
    usage.tick(datetime.fromtimestamp(1_800_000_009, UTC))  # the same slot
    usage.tick(datetime.fromtimestamp(1_800_000_010, UTC))
    assert asked == [
        ("vms.tasks.sample_usage", 1_800_000_000, 20),
        ("vms.tasks.sample_usage", 1_800_000_010, 20),
    ]
    assert {"vms.tasks.sample_usage", "vms.tasks.rollup_usage"} <= ALLOWED_TASKS
    # A task taken too late for its slot samples nothing.
    assert usage.sample_task(int(time.time()) - 60) == 0


# --- Planning a query over the tiers ----------------------------------------------------------


def test_a_range_over_all_tiers_takes_each_bucket_from_the_right_one() -> None:
    now = 1_800_000_000
    cover = {
        "10s": (now - usage.DAY, math.inf),
        "1m": (now - 7 * usage.DAY, now - 120),
        "1h": (now - 365 * usage.DAY, now // HOUR * HOUR - HOUR),
    }
    # 10 days at 1 min: older than a week only hours exist (at 1 h); then minutes; the last two
    # minutes (not folded yet) from the raw samples.
    segs = usage.plan(now - 10 * usage.DAY, now, 60, cover)
    assert [(s.tier.name, s.width) for s in segs] == [("1h", HOUR), ("1m", 60), ("10s", 60)]
    assert segs[0].end == segs[1].start and segs[1].end == segs[2].start == now - 120
    assert segs[1].start <= now - 7 * usage.DAY + HOUR
    # At 1 h: hours as far as folded, then the running hour from minutes and raw samples.
    segs = usage.plan(now - 3 * usage.DAY, now, HOUR, cover)
    assert segs[0].tier.name == "1h" and segs[0].end == now // HOUR * HOUR - HOUR
    assert all(s.width == HOUR for s in segs)
    assert segs[-1].end >= now
    # Buckets never overlap and never leave a hole where a tier holds data.
    for a, b in zip(segs, segs[1:], strict=False):
        assert a.end == b.start


# --- The API ------------------------------------------------------------------------------------


@pytest.fixture
def history(owner: Any) -> dict[str, Any]:
    """Three days of one VM: the last 26 hours as raw samples (cpu 50) folded into minutes and
    hours as the job would, older hours written as the hour tier holds them (cpu avg 20, max
    30)."""
    vm = running_vm(owner, "hist")
    now = time.time()
    raw_start = int(now - 26 * HOUR) // HOUR * HOUR
    raw(vm, raw_start, int(now) // 10 * 10, cpu=50.0, mem=2e8)
    old = [
        UsageHour(vm=vm, ts=ts, cpu_sum=360 * 20.0, cpu_count=360, cpu_max=30.0)
        for ts in range(raw_start - 48 * HOUR, raw_start, HOUR)
    ]
    UsageHour.objects.bulk_create(old)
    UsageRollupState.objects.create(tier="1h", until=raw_start)
    UsageRollupState.objects.create(tier="1m", until=raw_start)
    usage.rollup(now=now)
    return {"vm": vm, "raw_start": raw_start, "now": now}


def api(user: Any) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def test_the_vm_api_merges_a_range_that_spans_the_tiers(owner: Any, history: Any) -> None:
    vm, raw_start, now = history["vm"], history["raw_start"], history["now"]
    assert not UsageSample.objects.filter(ts__lt=now - usage.DAY - 60).exists()  # pruned
    r = api(owner.user).get(
        f"/api/v1/vms/{vm.pk}/usage/", {"from": int(now - 72 * HOUR), "to": int(now), "step": "1h"}
    )
    assert r.status_code == 200, r.content
    body = r.json()
    points = body["points"]
    tiers = [s["tier"] for s in body["segments"]]
    assert tiers[0] == "1h" and tiers[-1] in ("1m", "10s")
    ts = [p["ts"] for p in points]
    assert ts == sorted(set(ts)) and all(p["step"] == HOUR for p in points)
    for p in points:
        expected = (20.0, 30.0) if p["ts"] < raw_start else (50.0, 50.0)
        assert (p["cpu"]["avg"], p["cpu"]["max"]) == expected, p
        assert p["net_rx"] is None
    assert len([p for p in points if p["ts"] >= raw_start]) >= 26

    # At 30 s over 26 hours: the first two hours (past the raw day) at 1 min, the rest at 30 s.
    r = api(owner.user).get(
        f"/api/v1/vms/{vm.pk}/usage/", {"from": int(now - 26 * HOUR), "to": int(now), "step": "30s"}
    )
    body = r.json()
    assert [(s["tier"], s["step"]) for s in body["segments"]][:2] == [("1m", 60), ("10s", 30)]
    widths = {p["step"] for p in body["points"]}
    assert widths == {60, 30}
    assert all(p["cpu"]["avg"] == 50.0 for p in body["points"])
    starts = [p["ts"] for p in body["points"]]
    assert starts == sorted(set(starts))


def test_a_users_usage_sums_its_vms(owner: Any) -> None:
    a, b = running_vm(owner, "a"), running_vm(owner, "b")
    now = time.time()
    start = int(now - 900) // 300 * 300
    raw(a, start, start + 300, cpu=10.0, mem=100.0)
    raw(b, start, start + 300, cpu=lambda ts: 30.0 if ts == start else 20.0, mem=50.0)
    r = api(owner.user).get(
        f"/api/v1/users/{owner.user.pk}/usage/",
        {"from": start, "to": start + 300, "step": "5m"},
    )
    assert r.status_code == 200, r.content
    body = r.json()
    assert body["rollup"] is True and body["vms"] == 2
    [p] = body["points"]
    assert p["cpu"]["avg"] == round(10.0 + (30 + 29 * 20) / 30, 3)
    assert p["cpu"]["max"] == 40.0  # 10 + 30: the most both could have used at once
    assert p["mem"]["avg"] == 150.0


def test_group_and_host_roll_ups_sum_only_their_vms(
    owner: Any, caller_for: Any, make_user: Any
) -> None:
    from django.contrib.auth.models import Group

    other = caller_for("operator")
    team = Group.objects.create(name="team")
    owner.user.groups.add(team)
    mine_a = running_vm(owner, "a", host="host-a")
    mine_b = running_vm(owner, "b", host="host-b")
    theirs = running_vm(other, "c", host="host-a")
    start = int(time.time() - 900) // 300 * 300
    for vm, cpu in ((mine_a, 10.0), (mine_b, 20.0), (theirs, 40.0)):
        raw(vm, start, start + 300, cpu=cpu)
    viewer = api(make_user("viewer"))
    query = {"from": start, "to": start + 300, "step": "5m"}

    def cpu_of(url: str) -> tuple[int, float]:
        body = viewer.get(url, query).json()
        return body["vms"], body["points"][0]["cpu"]["avg"]

    team_id = team.pk
    assert cpu_of(f"/api/v1/groups/{team_id}/usage/") == (2, 30.0)  # not the other's VM
    assert cpu_of("/api/v1/hosts/host-a/usage/") == (2, 50.0)  # both users' VMs on host-a
    assert cpu_of("/api/v1/hosts/host-b/usage/") == (1, 20.0)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"from": "yesterday"}, "from"),
        ({"from": "2026-01-01T00:00:00"}, "from"),  # no zone
        ({"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "from"),
        ({"from": "2024-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "from"),
        ({"to": "9999-12-31T23:59:59Z", "from": "9999-12-31T20:00:00Z"}, "from"),
        ({"to": "0.5"}, "from"),
        ({"step": "7s"}, "step"),
        ({"step": "-1h"}, "step"),
        ({"from": "2026-01-01T00:00:00Z", "to": "2026-01-03T00:00:00Z", "step": "10s"}, "step"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(owner: Any, params: Any, field: str) -> None:
    vm = running_vm(owner, "bad")
    r = api(owner.user).get(f"/api/v1/vms/{vm.pk}/usage/", params)
    assert r.status_code == 400, r.content
    assert field in r.json(), r.json()


def test_who_sees_which_usage(owner: Any, make_user: Any, issue_token: Any) -> None:
    vm = running_vm(owner, "seen", host="host-a")
    other, viewer, admin = make_user("operator"), make_user("viewer"), make_user("admin")
    from django.contrib.auth.models import Group

    role_group = Group.objects.get(name="operator")
    urls = {
        "vm": f"/api/v1/vms/{vm.pk}/usage/",
        "user": f"/api/v1/users/{owner.user.pk}/usage/",
        "group": f"/api/v1/groups/{role_group.pk}/usage/",
        "host": "/api/v1/hosts/host-a/usage/",
    }
    expected = {
        "owner": {"vm": 200, "user": 200, "group": 403, "host": 403},
        "other": {"vm": 404, "user": 404, "group": 403, "host": 403},
        "viewer": {"vm": 200, "user": 200, "group": 200, "host": 200},
        "admin": {"vm": 200, "user": 200, "group": 200, "host": 200},
    }
    users = {"owner": owner.user, "other": other, "viewer": viewer, "admin": admin}
    for who, codes in expected.items():
        for what, code in codes.items():
            r = api(users[who]).get(urls[what])
            assert r.status_code == code, (who, what, r.content)
    # Whoever may not see the subject learns nothing from bad input either.
    assert api(other).get(urls["vm"], {"step": "7s"}).status_code == 404
    # Unknown subjects; no credentials.
    assert api(admin).get("/api/v1/hosts/nowhere/usage/").status_code == 404
    assert api(admin).get("/api/v1/users/999999/usage/").status_code == 404
    assert api(admin).get("/api/v1/groups/999999/usage/").status_code == 404
    assert APIClient().get(urls["vm"]).status_code == 401
    # A token scoped to something else than VMs may not read usage.
    token = issue_token(make_user("auditor"), scopes=["audit.view_audit_trail"])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    assert client.get(urls["vm"]).status_code == 403
