"""The webhooks' Prometheus metrics, registered by ``WebhooksConfig.ready`` (``core.metrics``).

Read from the tables at scrape time (the pump runs in worker processes, whose counters no
scrape would see): ``sandbox_webhook_deliveries{status}``, the deliveries kept by status
(pending ones include those waiting for a retry); ``sandbox_webhook_subscriptions{state}``
(active, disabled); ``sandbox_webhook_dispatch_lag_events``, events appended since the
dispatcher's cursor.
"""

from __future__ import annotations

from collections.abc import Iterator

from django.db.models import Count
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from audit.events import head
from core import metrics
from webhooks.models import Delivery, DispatchState, Subscription

__all__ = ["COLLECTORS", "WebhookCollector", "register"]


class WebhookCollector(Collector):
    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "sandbox_webhook_deliveries",
                "Webhook deliveries kept, by status.",
                labels=["status"],
            ),
            GaugeMetricFamily(
                "sandbox_webhook_subscriptions",
                "Webhook subscriptions, by state.",
                labels=["state"],
            ),
            GaugeMetricFamily(
                "sandbox_webhook_dispatch_lag_events",
                "Events appended after the webhook dispatcher's cursor.",
            ),
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        deliveries, subscriptions, lag = self._families()
        counts = dict(Delivery.objects.order_by().values_list("status").annotate(n=Count("pk")))
        for status in Delivery.Status.values:
            deliveries.add_metric([status], counts.get(status, 0))
        states = dict(Subscription.objects.order_by().values_list("active").annotate(n=Count("pk")))
        subscriptions.add_metric(["active"], states.get(True, 0))
        subscriptions.add_metric(["disabled"], states.get(False, 0))
        position = DispatchState.objects.filter(pk=1).values_list("position", flat=True).first()
        lag.add_metric([], max(0, head()[0] - (position or 0)))
        yield deliveries
        yield subscriptions
        yield lag


COLLECTORS = (WebhookCollector(),)


def register() -> None:
    metrics.register(*COLLECTORS)
