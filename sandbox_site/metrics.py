"""Prometheus metrics of the web and worker processes, and the /metrics view.

Counters live in each process; gauges that describe shared state (event store head, projection
lag) are read from the database at scrape time by a collector, so any process reports the truth.
"""

from __future__ import annotations

from collections.abc import Iterator

from django.http import HttpRequest, HttpResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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


def metrics_view(request: HttpRequest) -> HttpResponse:
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
