"""Signed webhooks: subscriptions to event types, delivered from the log by the workers."""

from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate

from core import schedules, ticks

# The subscriptions' event types join the catalogue while the apps load (before it is read).
from webhooks import catalogue  # noqa: F401


def ensure_schedules(sender: Any = None, **kwargs: Any) -> None:
    """The pump every minute as a safety net (the worker's main process starts it within a
    second of an event or a due retry: ``webhooks.trigger``); pruning and re-sealing hourly."""
    schedules.ensure(
        [
            ("webhooks.pump", "webhooks.tasks.pump", 1),
            ("webhooks.maintain", "webhooks.tasks.maintain", 60),
        ]
    )


class WebhooksConfig(AppConfig):
    name = "webhooks"
    verbose_name = "Webhooks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Here, not at the top: these load the app's models, which need the app registry.
        from webhooks import metrics, trigger

        metrics.register()
        ticks.register("webhooks", trigger.tick)
        post_migrate.connect(ensure_schedules, sender=self)
