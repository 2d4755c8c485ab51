"""Prometheus metrics of the web and worker processes, and the /metrics view.

Counters live in each process; gauges that describe shared state (event store head, projection
lag) are read from the database at scrape time by a collector, so any process reports the truth.
The VM collector samples this host's live VMs at scrape time (VMM process, device counters) and
adds the guest health last sampled by a page that watches the VM.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from audit.metrics import AuditCollector
from vms.metrics import WorkerCollector

REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_REQUESTS = Counter(
    "sandbox_http_requests_total",
    "HTTP requests served, by method, route kind and status class.",
    ["method", "kind", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "sandbox_http_request_seconds",
    "HTTP request latency.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
EVENTS_APPENDED = Counter(
    "sandbox_events_appended_total",
    "Events appended by this process, by event type.",
    ["type"],
    registry=REGISTRY,
)
APPEND_FAILURES = Counter(
    "sandbox_event_append_failures_total",
    "Appends refused, by reason (conflict, unavailable).",
    ["reason"],
    registry=REGISTRY,
)


def _kind(path: str) -> str:
    for prefix, kind in (("/api/", "api"), ("/static/", "static"), ("/metrics", "metrics")):
        if path.startswith(prefix):
            return kind
    if path in ("/healthz", "/readyz"):
        return "health"
    return "dashboard"


def observe_request(request: HttpRequest, response: HttpResponse, elapsed: float) -> None:
    kind = _kind(request.path)
    HTTP_REQUESTS.labels(request.method or "", kind, f"{response.status_code // 100}xx").inc()
    HTTP_LATENCY.labels(kind).observe(elapsed)


class EventStoreCollector(Collector):
    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Without describe() the registry would call collect() (a database query) at import.
        yield GaugeMetricFamily("sandbox_event_store_head_position", "Last event position.")
        yield GaugeMetricFamily(
            "sandbox_projection_lag_events", "Events not yet applied.", labels=["projection"]
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from audit.projections import lag_by_projection
        from audit.store import head

        position, _ = head()
        g = GaugeMetricFamily("sandbox_event_store_head_position", "Last event position.")
        g.add_metric([], position)
        yield g
        lag = GaugeMetricFamily(
            "sandbox_projection_lag_events",
            "Events not yet applied by each projection.",
            labels=["projection"],
        )
        for name, behind in lag_by_projection(position).items():
            lag.add_metric([name], behind)
        yield lag


REGISTRY.register(EventStoreCollector())


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
        from vms.metrics_live import prometheus_samples

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


REGISTRY.register(VMCollector())
REGISTRY.register(AuditCollector())  # digest age, unsigned events, last verification
REGISTRY.register(WorkerCollector())  # worker heartbeat per queue


def scrape_allowed(request: HttpRequest) -> bool:
    """A scraper with ``SANDBOX_METRICS_TOKEN`` as its bearer token, or from an address in
    ``SANDBOX_METRICS_ALLOWED_IPS`` (loopback by default): the families name every VM."""
    token = settings.SANDBOX_METRICS_TOKEN
    scheme, _, supplied = request.headers.get("Authorization", "").partition(" ")
    if token and scheme.lower() == "bearer":
        if hmac.compare_digest(supplied.strip().encode(), token.encode()):
            return True
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR") or "")
    except ValueError:
        return False
    address = getattr(address, "ipv4_mapped", None) or address  # ::ffff:a.b.c.d
    return any(
        address in ipaddress.ip_network(n, strict=False)
        for n in settings.SANDBOX_METRICS_ALLOWED_IPS
    )


def metrics_view(request: HttpRequest) -> HttpResponse:
    if not scrape_allowed(request):
        response = HttpResponse("metrics need the scrape token or an allowed address\n", status=403)
        if settings.SANDBOX_METRICS_TOKEN:
            response.status_code = 401
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        response["Content-Type"] = "text/plain; charset=utf-8"
        return response
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
