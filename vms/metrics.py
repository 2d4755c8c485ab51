"""The VM domain's Prometheus metrics, registered by ``VmsConfig.ready`` (``core.metrics``).

Worker clusters, from their heartbeats (``vms.heartbeat``):
``sandbox_worker_heartbeat_age_seconds{queue}``: seconds since a worker of the queue last took a
heartbeat task (the same figure ``/readyz`` judges); ``sandbox_worker_up{queue}``: 1 while that
age is within ``SANDBOX_WORKER_STALE_S``.

The live VMs of this host at scrape time (``vms.metrics_live``): VMM process CPU and memory, disk
and network counters, and the guest health last sampled by a page that watches the VM, each
labelled ``vm_id`` and ``vm``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from core import metrics
from vms.heartbeat import stale_s
from vms.metrics_live import prometheus_samples
from vms.models import PoolMember, PoolTarget, WorkerHeartbeat

__all__ = ["PoolCollector", "VMCollector", "WorkerCollector", "register"]


class WorkerCollector(Collector):
    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield self._age()
        yield self._up()

    def _age(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "sandbox_worker_heartbeat_age_seconds",
            "Seconds since a worker of the queue last took a heartbeat task.",
            labels=["queue"],
        )

    def _up(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "sandbox_worker_up",
            "1 while the queue's last heartbeat is within the stale time, else 0.",
            labels=["queue"],
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        age, up = self._age(), self._up()
        now = time.time()
        for queue, beat_at, started_at in WorkerHeartbeat.objects.values_list(
            "queue", "beat_at", "started_at"
        ):
            since = now - (beat_at or started_at).timestamp()
            if beat_at is not None:
                age.add_metric([queue], max(0.0, since))
            up.add_metric([queue], float(beat_at is not None and since <= stale_s()))
        yield age
        yield up


# Per-VM families: (name, help, Sample attribute, kind). Counters are exported as such so that
# Prometheus computes rates itself; the page's 1 Hz rates come from the same samples.
VM_FAMILIES = (
    ("sandbox_vm_cpu_seconds_total", "CPU time of the VM's VMM process.", "cpu_seconds", "c"),
    ("sandbox_vm_cpu_percent", "VMM CPU use since the previous sample, % of one core.",
     "cpu_percent", "g"),
    ("sandbox_vm_memory_rss_bytes", "Resident memory of the VM's VMM process.", "rss_bytes", "g"),
    ("sandbox_vm_disk_read_bytes_total", "Bytes read by the guest's disks.", "disk_read_bytes",
     "c"),
    ("sandbox_vm_disk_write_bytes_total", "Bytes written by the guest's disks.",
     "disk_write_bytes", "c"),
    ("sandbox_vm_network_receive_bytes_total", "Bytes received by the guest's NICs.",
     "net_rx_bytes", "c"),
    ("sandbox_vm_network_transmit_bytes_total", "Bytes sent by the guest's NICs.",
     "net_tx_bytes", "c"),
)  # fmt: skip


def _kib(value: int | None) -> int | None:
    return None if value is None else value * 1024


VM_HEALTH_FAMILIES = (
    ("sandbox_vm_guest_uptime_seconds", "Guest uptime (agent health).",
     lambda h: h.get("uptime_s")),
    ("sandbox_vm_guest_load1", "Guest 1-minute load average (agent health).",
     lambda h: (h.get("load") or [None])[0]),
    ("sandbox_vm_guest_memory_available_bytes", "Guest MemAvailable (agent health).",
     lambda h: _kib((h.get("memory_kib") or {}).get("available"))),
    ("sandbox_vm_guest_processes", "Processes in the guest (agent health).",
     lambda h: (h.get("processes") or {}).get("total")),
)  # fmt: skip


class VMCollector(Collector):
    """The live VMs of this host at scrape time: VMM process CPU and memory, disk and network
    counters (``vms.metrics_live``), and the guest health last sampled by a watching page."""

    LABELS = ("vm_id", "vm")

    def describe(self) -> Iterator[Any]:
        for name, help_text, _, kind in VM_FAMILIES:
            yield self._family(name, help_text, kind)
        for name, help_text, _ in VM_HEALTH_FAMILIES:
            yield GaugeMetricFamily(name, help_text, labels=self.LABELS)

    def _family(self, name: str, help_text: str, kind: str) -> Any:
        if kind == "c":
            return CounterMetricFamily(name.removesuffix("_total"), help_text, labels=self.LABELS)
        return GaugeMetricFamily(name, help_text, labels=self.LABELS)

    def collect(self) -> Iterator[Any]:
        samples = prometheus_samples()
        for name, help_text, attr, kind in VM_FAMILIES:
            family = self._family(name, help_text, kind)
            for s in samples:
                value = getattr(s, attr)
                if value is not None:
                    family.add_metric([s.vm_id, s.name], value)
            yield family
        for name, help_text, read in VM_HEALTH_FAMILIES:
            family = GaugeMetricFamily(name, help_text, labels=self.LABELS)
            for s in samples:
                value = read(s.health) if s.health else None
                if value is not None:
                    family.add_metric([s.vm_id, s.name], value)
            yield family


class PoolCollector(Collector):
    """Warm pools (``vms.pools``): members per template, host and state, and the targets admins
    set (``SANDBOX_POOLS`` targets are in the settings). Hand-outs, refills and evictions are
    events (``pool.*``): count them in the log."""

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "sandbox_pool_members",
                "Warm pool members by template, host and state (warming, ready).",
                labels=["template", "host", "state"],
            ),
            GaugeMetricFamily(
                "sandbox_pool_target",
                "A template's warm pool target as set by an administrator.",
                labels=["template"],
            ),
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        members, target = self._families()
        tally: dict[tuple[str, str, str], int] = {}
        for key in PoolMember.objects.values_list("template", "host", "state"):
            tally[key] = tally.get(key, 0) + 1
        for key, n in sorted(tally.items()):
            members.add_metric(list(key), n)
        for name, value in PoolTarget.objects.values_list("template", "target"):
            target.add_metric([name], value)
        yield members
        yield target


COLLECTORS: tuple[Collector, ...] = (
    VMCollector(),
    WorkerCollector(),  # worker heartbeat per queue
    PoolCollector(),
)


def register() -> None:
    """Put the VM domain's metrics in the process's registry (once; ``VmsConfig.ready``)."""
    metrics.register(*COLLECTORS)
