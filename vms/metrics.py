"""Prometheus gauges of the worker clusters, from their heartbeats (``vms.heartbeat``).

``sandbox_worker_heartbeat_age_seconds{queue}``: seconds since a worker of the queue last took a
heartbeat task (the same figure ``/readyz`` judges); ``sandbox_worker_up{queue}``: 1 while that
age is within ``SANDBOX_WORKER_STALE_S``. Registered by the site (``sandbox_site.metrics``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["WorkerCollector"]


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
        from vms.heartbeat import stale_s
        from vms.models import WorkerHeartbeat

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
