"""The VM domain: commands, projections, hypervisor drivers, guest agent client, API."""

from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.db.models.signals import post_migrate

from core import schedules, ticks

# The lifecycle table registers the VM domain's event types in the audit catalogue on import:
# here, while the apps load and before any model, projector or report reads the catalogue.
from vms import lifecycle  # noqa: F401


def ensure_schedules(sender: Any = None, **kwargs: Any) -> None:
    """Reconcile the host every minute, apply snapshot retention hourly, collect the network
    evidence every SANDBOX_NET_EVIDENCE_PERIOD_S (in whole minutes, at least one), fold and
    prune the usage history every minute."""
    evidence_minutes = max(1, round(int(settings.SANDBOX_NET_EVIDENCE_PERIOD_S) / 60))
    schedules.ensure(
        [
            ("vms.reconcile", "vms.tasks.reconcile", 1),
            ("vms.retention", "vms.tasks.apply_retention", 60),
            ("vms.net_evidence", "vms.tasks.collect_net_evidence", evidence_minutes),
            ("vms.usage_rollup", "vms.tasks.rollup_usage", 1),
        ]
    )


class VmsConfig(AppConfig):
    name = "vms"
    verbose_name = "Virtual machines"

    def ready(self) -> None:
        # Here, not at the top: these load the app's models, which need the app registry.
        # Importing recordings registers the console sessions' section of the auditor area and
        # their recordings as bundle attachments: audit names neither.
        from vms import (
            commands,
            idle,
            lifetimes,
            metrics,
            pools,
            pressure,
            recordings,  # noqa: F401
            templates_config,
            usage,
        )

        metrics.register()
        # A usage sample of this host's VMs every 10 s (the worker's main process runs ticks).
        ticks.register("usage", usage.tick)
        # Lifetimes that ended: their stop or destroy asked within a second or so.
        ticks.register("lifetimes", lifetimes.tick)
        # Idle policies that ran out: their VMs' pause asked within a second or so.
        ticks.register("idle", idle.tick)
        # Warm pools kept at their targets (vms.pools; also refilled after each hand-out).
        ticks.register("pools", pools.tick)
        # Host pressure: low-priority VMs ballooned first, memory given back when it passes.
        ticks.register("pressure", pressure.tick)

        def ensure_default_network(sender: Any = None, **kwargs: Any) -> None:
            """The default network from the settings, once (net.network_created). Not under
            the tests, whose logs start empty: there the first create makes it."""
            if not settings.TESTING:
                commands.ensure_default_network()

        post_migrate.connect(ensure_default_network, sender=self, weak=False)

        post_migrate.connect(templates_config.sync_after_migrate, sender=self)
        post_migrate.connect(ensure_schedules, sender=self)
