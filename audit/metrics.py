"""The audit log's Prometheus metrics, registered by ``AuditConfig.ready`` (``core.metrics``).

Counters of this process's appends (``audit.store`` counts into them):

- ``sandbox_events_appended_total{type}``: events appended, by event type;
- ``sandbox_event_append_failures_total{reason}``: appends refused (conflict, unavailable).

Gauges of the shared log, read from the database at scrape time, so any process reports the
truth: ``sandbox_event_store_head_position`` and ``sandbox_projection_lag_events{projection}``
(followed projections), and the integrity of the log:

- ``sandbox_audit_digest_age_seconds``: how old the newest signed digest is (the worker signs
  one every minute, also when idle: alert when this passes a few minutes);
- ``sandbox_audit_events_unsigned``: events after the newest digest, not yet signed;
- ``sandbox_audit_digest_sequence``: the newest digest's number in the digest chain;
- ``sandbox_audit_last_verification_ok`` and ``..._timestamp_seconds``: the outcome and time of
  the last recorded chain verification (``audit.chain_verified``);
- ``sandbox_audit_last_digest_failure_timestamp_seconds``: the last refused or failed signing.

A scrape costs six indexed queries. This module imports no store: the store imports it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from audit.digests import last_digest
from audit.events import head
from audit.models import Event
from audit.projections import lag_by_projection
from core import metrics

__all__ = [
    "APPEND_FAILURES",
    "EVENTS_APPENDED",
    "AuditCollector",
    "EventStoreCollector",
    "register",
]

EVENTS_APPENDED = Counter(
    "sandbox_events_appended_total",
    "Events appended by this process, by event type.",
    ["type"],
    registry=None,
)
APPEND_FAILURES = Counter(
    "sandbox_event_append_failures_total",
    "Appends refused, by reason (conflict, unavailable).",
    ["reason"],
    registry=None,
)


class EventStoreCollector(Collector):
    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Without describe() the registry would call collect() (a database query) at register.
        yield GaugeMetricFamily("sandbox_event_store_head_position", "Last event position.")
        yield GaugeMetricFamily(
            "sandbox_projection_lag_events", "Events not yet applied.", labels=["projection"]
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
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


_FAMILIES = (
    ("sandbox_audit_digest_age_seconds", "Seconds since the newest signed digest was made."),
    ("sandbox_audit_events_unsigned", "Events appended after the newest signed digest."),
    ("sandbox_audit_digest_sequence", "Number of the newest digest in the digest chain."),
    ("sandbox_audit_last_verification_ok", "1 if the last chain verification passed, else 0."),
    (
        "sandbox_audit_last_verification_timestamp_seconds",
        "Unix time of the last recorded chain verification.",
    ),
    (
        "sandbox_audit_last_digest_failure_timestamp_seconds",
        "Unix time of the last refused or failed digest signing.",
    ),
)


class AuditCollector(Collector):
    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Without describe() the registry would call collect() (database queries) at register.
        for name, help_text in _FAMILIES:
            yield GaugeMetricFamily(name, help_text)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        values: dict[str, float] = {}
        position, _ = head()
        newest = last_digest()
        values["sandbox_audit_events_unsigned"] = position - (newest.end_position if newest else 0)
        if newest is not None:
            values["sandbox_audit_digest_age_seconds"] = max(
                0.0, time.time() - newest.created_at.timestamp()
            )
            values["sandbox_audit_digest_sequence"] = newest.sequence or 0
        verified = (
            Event.objects.filter(type="audit.chain_verified")
            .order_by("-position")
            .values_list("data", "recorded_at")
            .first()
        )
        if verified is not None:
            values["sandbox_audit_last_verification_ok"] = float(
                bool(json.loads(verified[0]).get("ok"))
            )
            values["sandbox_audit_last_verification_timestamp_seconds"] = verified[1].timestamp()
        failed = (
            Event.objects.filter(type="audit.digest_signing_failed")
            .order_by("-position")
            .values_list("recorded_at", flat=True)
            .first()
        )
        if failed is not None:
            values["sandbox_audit_last_digest_failure_timestamp_seconds"] = failed.timestamp()
        for name, help_text in _FAMILIES:
            family = GaugeMetricFamily(name, help_text)
            if name in values:
                family.add_metric([], values[name])
            yield family


COLLECTORS: tuple[Collector, ...] = (
    EVENTS_APPENDED,
    APPEND_FAILURES,
    EventStoreCollector(),
    AuditCollector(),  # digest age, unsigned events, last verification
)


def register() -> None:
    """Put the audit log's metrics in the process's registry (once; ``AuditConfig.ready``)."""
    metrics.register(*COLLECTORS)
