"""Handing VM work to the worker: django-q2 tasks, named by their dotted path.

The command functions enqueue a request's task on commit of the request; the reconciler enqueues
again a request nobody picked up. The task functions live in ``vms.tasks``, above the worker and
so above the commands: naming them by path (as the broker carries them anyway) keeps this
module, and everything that enqueues, below them. Each name is in ``vms.task_guard``'s list.
"""

from __future__ import annotations

import os
import threading

from django.conf import settings
from django_q.brokers import Broker, get_broker
from django_q.tasks import async_task

__all__ = ["network_bridge", "network_rules", "pool_refill", "request", "snapshot_cleanup"]

# One broker per process, kept: django-q2 makes a new one (for Redis: a new client, so a new TCP
# connection and its handshake) for every task it is not given one for, and a hand-out or a
# request's commit would pay that on the user's time. Keyed by process id: a forked worker
# makes its own (redis-py's pool also notices the fork).
_brokers: dict[int, Broker] = {}
_brokers_lock = threading.Lock()


def broker() -> Broker:
    """This process's broker (django-q2's ``get_broker``, made once)."""
    pid = os.getpid()
    found = _brokers.get(pid)
    if found is None:
        with _brokers_lock:
            found = _brokers.get(pid)
            if found is None:
                found = _brokers[pid] = get_broker()
    return found


def request(event_id: str) -> None:
    """Carry out the request event ``event_id`` (``vms.tasks.run_request``)."""
    async_task(
        "vms.tasks.run_request",
        event_id,
        task_name=f"request-{event_id}",
        timeout=settings.Q_CLUSTER["timeout"],
        broker=broker(),
    )


def snapshot_cleanup(snapshot_id: str) -> None:
    """Remove a deleted snapshot's files (``vms.tasks.cleanup_snapshot``)."""
    async_task(
        "vms.tasks.cleanup_snapshot",
        snapshot_id,
        task_name=f"snapshot-cleanup-{snapshot_id}",
        broker=broker(),
    )


def network_rules(vm_id: str) -> None:
    """Apply a VM's network rules again after its forwards or egress changed
    (``vms.tasks.apply_network``; idempotent: it applies what the records say now)."""
    async_task("vms.tasks.apply_network", vm_id, task_name=f"network-{vm_id}", broker=broker())


def network_bridge(network_id: str) -> None:
    """Apply a network's isolation setting to its bridge and base rules after it changed
    (``vms.tasks.apply_network_settings``), so VMs already on it follow at once."""
    async_task(
        "vms.tasks.apply_network_settings",
        network_id,
        task_name=f"network-settings-{network_id}",
        broker=broker(),
    )


def pool_refill(delay_s: float = 0.0) -> None:
    """Bring the warm pools of the host that runs it to their targets (``vms.tasks.refill_pools``;
    one refill at a time per host: a second finds the first's lock and returns). ``delay_s``:
    wait that long first (after a hand-out: the new VM's first commands go before the refill's
    restore takes a core)."""
    async_task(
        "vms.tasks.refill_pools", delay_s, task_name="pool-refill", timeout=600, broker=broker()
    )
