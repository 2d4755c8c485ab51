"""Worker tasks of the audit log (scheduled by ``audit.apps``)."""

from __future__ import annotations

from audit.actor import Actor
from audit.commands import sign_digest as sign
from audit.exports import run_export as run
from audit.projections import run_pending


def run_projections() -> int:
    return run_pending()


def sign_digest() -> int | None:
    """The minutely digest (also when idle); a failure is recorded as an event and raised."""
    digest = sign(Actor.system(channel="worker", name="digest-signer"), scheduled=True)
    return digest.sequence if digest else None


def run_export(job_id: str) -> str:
    """Produce a queued audit export (``audit.exports``); safe to deliver twice."""
    return run(job_id)
