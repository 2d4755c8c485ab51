"""The site's own metrics (HTTP requests and their latency) and the /metrics view.

/metrics writes out the process's registry (``core.metrics``), in which each app registers its
own metrics from its ``AppConfig.ready``: the event store, projections and the log's integrity
(``audit.metrics``), worker heartbeats and the live VMs of this host (``vms.metrics``). Counters
live in each process; gauges that describe shared state are read at scrape time.
"""

from __future__ import annotations

import hmac
import ipaddress

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from prometheus_client.registry import Collector

from core import metrics
from core.metrics import REGISTRY

__all__ = ["REGISTRY", "metrics_view", "observe_request", "register", "scrape_allowed"]

HTTP_REQUESTS = Counter(
    "sandbox_http_requests_total",
    "HTTP requests served, by method, route kind and status class.",
    ["method", "kind", "status"],
    registry=None,
)
HTTP_LATENCY = Histogram(
    "sandbox_http_request_seconds",
    "HTTP request latency.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=None,
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


COLLECTORS: tuple[Collector, ...] = (HTTP_REQUESTS, HTTP_LATENCY)


def register() -> None:
    """Put the site's own metrics in the process's registry (once; ``SiteConfig.ready``)."""
    metrics.register(*COLLECTORS)


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
