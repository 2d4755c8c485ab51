"""The VM domain: commands, projections, hypervisor drivers, guest agent client, API."""

from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate


def ensure_schedules(sender: Any = None, **kwargs: Any) -> None:
    from django_q.models import Schedule

    for name, func, minutes in (
        ("vms.reconcile", "vms.tasks.reconcile", 1),
        ("vms.retention", "vms.tasks.apply_retention", 60),
    ):
        Schedule.objects.update_or_create(
            name=name,
            defaults={
                "func": func,
                "schedule_type": Schedule.MINUTES,
                "minutes": minutes,
                "repeats": -1,
            },
        )


class VmsConfig(AppConfig):
    name = "vms"
    verbose_name = "Virtual machines"

    def ready(self) -> None:
        from vms import templates_config

        post_migrate.connect(templates_config.sync_after_migrate, sender=self)
        post_migrate.connect(ensure_schedules, sender=self)
