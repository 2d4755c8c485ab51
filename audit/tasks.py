"""Worker tasks of the audit log (scheduled by ``audit.apps``)."""

from __future__ import annotations

from audit.actor import Actor


def run_projections() -> int:
    from audit.projections import run_pending

    return run_pending()


def sign_digest() -> int | None:
    """The minutely digest (also when idle); a failure is recorded as an event and raised."""
    from audit.commands import sign_digest as sign

    digest = sign(Actor.system(channel="worker", name="digest-signer"), scheduled=True)
    return digest.sequence if digest else None


def run_export(job_id: str) -> str:
    """Produce a queued audit export (``audit.exports``); safe to deliver twice."""
    from audit.exports import run_export as run

    return run(job_id)
