"""The worker's task of the secrets store (named in ``vms.task_guard.ALLOWED_TASKS``)."""

from __future__ import annotations

from typing import Any

from secretstore import commands


def reencrypt() -> dict[str, Any]:
    """Re-encrypt every secret under the current key (idempotent: a second run finds none)."""
    report = commands.reencrypt_all()
    return {
        "current_key": report.current_key,
        "total": report.total,
        "reencrypted": report.reencrypted,
        "failed": len(report.failed or []),
    }
