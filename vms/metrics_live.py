"""Live VM metrics: VMM process CPU and memory, disk and network counters, guest health.

A ``VMSampler`` per VM (kept in a process-wide registry) reads, synchronously and off the event
loop: ``/proc/<vmm pid>/stat`` and ``status`` (CPU seconds, RSS), the driver's ``counters()``
(block and NIC bytes), and, every ``HEALTH_EVERY_S`` at most, the guest agent's ``health``
through ``vms.guest.agent_session``. The agent channel takes one client at a time, so health is
never sampled more often than that and never while a sample is still running; QMP is skipped while
the VM has a request in flight, so the worker has the control socket to itself.

Two readers share the samplers: ``MetricsHub`` pushes a sample per second to the websockets of a
VM's page (one sampling task per VM per process, whatever the number of viewers), and
``prometheus_samples`` gives the /metrics collector the current numbers of every VM on this host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from django.db import connection

from vms import guest, runtime
from vms.models import VirtualMachine

log = logging.getLogger("sandbox.vms.metrics")

INTERVAL_S = 1.0
HEALTH_EVERY_S = 5.0
HEALTH_STALE_S = 30.0
LIVE_STATES = frozenset({"running", "paused"})
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Sample:
    vm_id: str
    name: str
    state: str
    at: float
    pid: int | None = None
    cpu_seconds: float | None = None
    cpu_percent: float | None = None  # of one core, since the previous sample
    rss_bytes: int | None = None
    disk_read_bytes: int | None = None
    disk_write_bytes: int | None = None
    net_rx_bytes: int | None = None
    net_tx_bytes: int | None = None
    disk_read_bps: float | None = None
    disk_write_bps: float | None = None
    net_rx_bps: float | None = None
    net_tx_bps: float | None = None
    health: dict[str, Any] | None = None
    health_age_s: float | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_proc(pid: int) -> tuple[float, int] | None:
    """(CPU seconds user+system, resident bytes) of ``pid``; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
        with open(f"/proc/{pid}/statm") as fh:
            statm = fh.read().split()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _TICK, int(statm[1]) * _PAGE


def sum_counters(counters: dict[str, dict[str, int]]) -> dict[str, int]:
    total = {"read_bytes": 0, "write_bytes": 0, "rx_bytes": 0, "tx_bytes": 0}
    for dev in counters.values():
        for key in total:
            total[key] += int(dev.get(key, 0))
    return total


class VMSampler:
    """Samples one VM; thread-safe (a lock serializes samples of one VM)."""

    def __init__(self, vm_id: str) -> None:
        self.vm_id = vm_id
        self.last: Sample | None = None
        self.health: dict[str, Any] | None = None
        self.health_at = 0.0
        self._prev_mono = 0.0
        self._lock = threading.Lock()
        self._health_lock = threading.Lock()

    def sample(self, vm: Any | None = None) -> Sample:
        with self._lock:
            if vm is None:
                vm = VirtualMachine.objects.filter(pk=self.vm_id).first()
            now = time.monotonic()
            s = Sample(self.vm_id, vm.name if vm else "", vm.state if vm else "gone", time.time())
            prev = self.last
            # A VM suspended to disk (vms.idle) has no VMM to sample.
            if vm is not None and vm.state in LIVE_STATES and not vm.suspended_to_disk:
                rt = runtime.runtime_dir(vm.pk)
                s.pid = rt.pid()
                proc = read_proc(s.pid) if s.pid else None
                if proc is not None:
                    s.cpu_seconds, s.rss_bytes = proc
                if not vm.pending_request:
                    try:
                        totals = sum_counters(runtime.hypervisor().counters(rt))
                        s.disk_read_bytes = totals["read_bytes"]
                        s.disk_write_bytes = totals["write_bytes"]
                        s.net_rx_bytes = totals["rx_bytes"]
                        s.net_tx_bytes = totals["tx_bytes"]
                    except Exception as exc:
                        s.notes.append(f"counters: {exc}")
                else:
                    s.notes.append(f"counters paused while {vm.pending_type} runs")
                if prev is not None and prev.state in LIVE_STATES:
                    dt = now - self._prev_mono
                    if dt > 0:
                        s.cpu_percent = _rate(prev.cpu_seconds, s.cpu_seconds, dt, 100.0)
                        s.disk_read_bps = _rate(prev.disk_read_bytes, s.disk_read_bytes, dt)
                        s.disk_write_bps = _rate(prev.disk_write_bytes, s.disk_write_bytes, dt)
                        s.net_rx_bps = _rate(prev.net_rx_bytes, s.net_rx_bytes, dt)
                        s.net_tx_bps = _rate(prev.net_tx_bytes, s.net_tx_bytes, dt)
                if self.health is not None and now - self.health_at < HEALTH_STALE_S:
                    s.health = self.health
                    s.health_age_s = round(now - self.health_at, 1)
            self._prev_mono = now
            self.last = s
            return s

    def health_due(self) -> bool:
        return time.monotonic() - self.health_at >= HEALTH_EVERY_S

    def sample_health(self) -> dict[str, Any] | None:
        """The agent's health; None when another probe runs or the guest cannot be reached."""
        if not self._health_lock.acquire(blocking=False):
            return None
        try:
            vm = VirtualMachine.objects.filter(pk=self.vm_id).first()
            if vm is None or vm.state != "running" or vm.pending_request:
                return None
            try:
                with guest.agent_session(vm, hello_timeout=3.0) as agent:
                    health = agent.health()
            except (guest.GuestUnavailable, Exception) as exc:  # any agent trouble: no sample
                log.debug("health of %s: %s", self.vm_id, exc)
                self.health_at = time.monotonic()  # don't retry before the next period
                return None
            self.health, self.health_at = health, time.monotonic()
            return health
        finally:
            self._health_lock.release()


def _rate(before: float | None, after: float | None, dt: float, scale: float = 1.0) -> float | None:
    if before is None or after is None or after < before:
        return None
    return round((after - before) / dt * scale, 2)


def _with_db(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` (in a thread of the loop's default executor) and close the database connection
    it opened: executor threads are shared and live on, and must not each keep one open."""
    try:
        return fn()
    finally:
        connection.close()


_samplers: dict[str, VMSampler] = {}
_samplers_lock = threading.Lock()


def sampler_for(vm_id: str) -> VMSampler:
    with _samplers_lock:
        sampler = _samplers.get(vm_id)
        if sampler is None:
            sampler = _samplers[vm_id] = VMSampler(vm_id)
        return sampler


def prometheus_samples() -> list[Sample]:
    """Current samples of the live VMs on this host, for the /metrics collector (sync).

    A sample younger than the interval is reused (a page is watching); otherwise one is taken.
    """
    out: list[Sample] = []
    live = VirtualMachine.objects.filter(state__in=LIVE_STATES, host=runtime.host_name())
    seen = set()
    for vm in live:
        sampler = sampler_for(str(vm.pk))
        seen.add(str(vm.pk))
        last = sampler.last
        if last is not None and time.time() - last.at < INTERVAL_S:
            out.append(last)
        else:
            out.append(sampler.sample(vm))
    with _samplers_lock:  # forget VMs that are gone from this host
        for vm_id in [k for k in _samplers if k not in seen and k not in _hubs_vm_ids()]:
            del _samplers[vm_id]
    return out


# --- Pushing samples to the VM page -------------------------------------------------------------


class MetricsHub:
    """One sampling task per VM per process, fanned out to the pages that watch it."""

    def __init__(self, vm_id: str) -> None:
        self.vm_id = vm_id
        self.sampler = sampler_for(vm_id)
        self.subscribers: set[Callable[[dict[str, Any]], None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._health: asyncio.Task[Any] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"metrics-{self.vm_id}")

    async def stop(self) -> None:
        for task in (self._task, self._health):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = self._health = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                sample = await asyncio.to_thread(_with_db, self.sampler.sample)
            except Exception as exc:
                log.warning("metrics of %s: %s", self.vm_id, exc)
            else:
                message = {"type": "metrics", "sample": sample.as_dict()}
                for push in list(self.subscribers):
                    push(message)
                if (
                    sample.state == "running"
                    and self.sampler.health_due()
                    and (self._health is None or self._health.done())
                ):
                    # Its own task: a busy agent channel never delays the 1 Hz samples.
                    self._health = asyncio.create_task(
                        asyncio.to_thread(_with_db, self.sampler.sample_health)
                    )
            next_at += INTERVAL_S
            await asyncio.sleep(max(0.0, next_at - loop.time()))


_hubs: dict[str, MetricsHub] = {}


def _hubs_vm_ids() -> set[str]:
    return set(_hubs)


async def subscribe(vm_id: str, push: Callable[[dict[str, Any]], None]) -> MetricsHub:
    hub = _hubs.get(vm_id)
    if hub is None or hub._task is None or hub._task.done():
        hub = _hubs[vm_id] = MetricsHub(vm_id)
        hub.start()
    hub.subscribers.add(push)
    return hub


async def unsubscribe(hub: MetricsHub, push: Callable[[dict[str, Any]], None]) -> None:
    hub.subscribers.discard(push)
    if not hub.subscribers:
        if _hubs.get(hub.vm_id) is hub:
            del _hubs[hub.vm_id]
        await hub.stop()
