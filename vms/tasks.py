"""django-q2 entry points for VM work. Tasks take ids, never model instances.

They are enqueued by name (``vms.enqueue``), so nothing below the worker imports this module.
"""

from __future__ import annotations

from vms import idle, lifetimes, pools, pressure, retention, usage, vmnet, worker
from vms import reconcile as reconciler


def run_request(event_id: str) -> str:
    return worker.handle(event_id)


def cleanup_snapshot(snapshot_id: str) -> None:
    worker.cleanup_snapshot(snapshot_id)


def reconcile() -> dict[str, int]:
    return reconciler.reconcile(startup=False)


def apply_retention() -> int:
    return retention.apply_retention()


def apply_network(vm_id: str) -> str:
    """Re-apply a VM's rules after a forward or its egress policy changed."""
    return vmnet.reapply(vm_id)


def apply_network_settings(network_id: str) -> str:
    """Apply a network's changed isolation to its bridge's ports and the base rules."""
    return vmnet.apply_network_settings(network_id)


def collect_net_evidence() -> int:
    """Refused connections and lookups of every plugged VM, as evidence events."""
    return vmnet.collect_evidence()


def sample_usage(slot: int) -> int:
    """One usage sample of every live VM of this host (``vms.usage``; the ticks enqueue it)."""
    return usage.sample_task(slot)


def rollup_usage() -> dict[str, int]:
    """Fold the usage history into its minute and hour tiers and prune each tier."""
    return usage.rollup()


def expire_lifetimes() -> int:
    """Stop or destroy the VMs whose lifetime has ended (``vms.lifetimes``; a tick enqueues it)."""
    return lifetimes.expire()


def pause_idle_vms() -> int:
    """Pause the VMs whose idle policy has run out (``vms.idle``; a tick enqueues it)."""
    return idle.pause_idle_vms()


def refill_pools(delay_s: float = 0.0) -> dict[str, int]:
    """Bring this host's warm pools to their targets (``vms.pools``)."""
    return pools.refill(delay_s)


def relieve_pressure() -> int:
    """One pass of the host pressure loop (``vms.pressure``; a tick enqueues it)."""
    return len(pressure.relieve())
