"""The event store app."""

from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate, pre_migrate

from audit import roles
from core import postgres, schedules


def ensure_schedules(sender: Any = None, **kwargs: Any) -> None:
    """The worker's recurring jobs: follow the log, sign digests."""
    schedules.ensure(
        [
            ("audit.run_projections", "audit.tasks.run_projections", 1),
            # Every minute, busy or idle: the newest digest is never more than a minute old.
            ("audit.sign_digest", "audit.tasks.sign_digest", 1),
        ]
    )


class AuditConfig(AppConfig):
    name = "audit"
    verbose_name = "Audit log"

    def ready(self) -> None:
        # Here, not at the top: audit.metrics loads the app's models, which need the registry.
        from audit import metrics

        metrics.register()
        # The log's schema only moves forward; the runtime role is granted after each migrate
        # (first: the receivers after it may write as that role).
        pre_migrate.connect(roles.refuse_reversing_the_log, sender=self)
        post_migrate.connect(roles.grant_after_migrate, sender=self)
        post_migrate.connect(ensure_schedules, sender=self)
        postgres.install()
