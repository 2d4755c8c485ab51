"""The process's Prometheus registry: each app registers its own metrics in it, the site serves it.

An app keeps its metrics in ``<app>/metrics.py`` (counters at module level, collectors that read
shared state at scrape time) and registers them from its ``AppConfig.ready`` with ``register``;
the site's /metrics view (``sandbox_site.metrics``) writes out whatever is registered. No app
imports another app's metrics, and the event store never imports the site.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

__all__ = ["REGISTRY", "register"]

# Not prometheus_client's global registry: that one also carries the process and GC collectors,
# which /metrics has never exported.
REGISTRY = CollectorRegistry(auto_describe=True)

_registered: set[int] = set()
_lock = threading.Lock()


def register(*collectors: Collector) -> None:
    """Register each collector (a counter, a histogram, a custom collector) once.

    Idempotent: ``ready()`` may run more than once in a process (tests call it again), and the
    same objects are then left as they are. A different collector with a name already taken
    still raises prometheus_client's ``ValueError``: two apps must not export one name.
    """
    with _lock:
        for collector in collectors:
            if id(collector) in _registered:
                continue
            REGISTRY.register(collector)
            _registered.add(id(collector))
