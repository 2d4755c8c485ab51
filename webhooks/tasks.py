"""The worker's tasks of the webhooks (named in ``vms.task_guard.ALLOWED_TASKS``)."""

from __future__ import annotations

from typing import Any

from webhooks import commands, dispatch


def pump() -> dict[str, Any]:
    """Fan new events out and send what is due (``webhooks.dispatch``); safe to run twice."""
    return dispatch.pump().as_dict()


def maintain() -> dict[str, Any]:
    """Hourly: prune old deliveries; encrypt again secrets under a key that is not current."""
    resealed, failed = commands.reseal_all()
    return {"pruned": dispatch.prune(), "resealed": resealed, "reseal_failed": len(failed)}
