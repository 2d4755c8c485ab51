"""Cheap checks the worker cluster's main process makes every second, for work that must start
sooner than a schedule's minute (webhook deliveries): each app registers a function that looks
(one or two small queries) and enqueues a task when there is something to do.

The worker command (``vms``) runs them; the apps register theirs from ``AppConfig.ready``, so
the command names none of them. A tick must be quick and must not block: the same loop sends
the cluster's heartbeat.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

__all__ = ["Tick", "register", "registered", "run"]

log = logging.getLogger("sandbox.ticks")

Tick = Callable[[datetime], None]

_ticks: dict[str, Tick] = {}
_lock = threading.Lock()


def register(name: str, tick: Tick) -> None:
    """Register ``tick`` under ``name`` (again with the same name: replaced, as a second
    ``ready()`` would)."""
    with _lock:
        _ticks[name] = tick


def registered() -> dict[str, Tick]:
    with _lock:
        return dict(_ticks)


def run(now: datetime) -> None:
    """Run every registered tick; one that fails is logged and does not stop the others."""
    for name, tick in registered().items():
        try:
            tick(now)
        except Exception:
            log.warning("worker tick %s failed", name, exc_info=True)
