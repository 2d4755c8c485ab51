"""Retention of the audit log: the cut-off in calendar years, legal holds, and what is kept.

Events are kept for ``SANDBOX_AUDIT_RETENTION_YEARS`` calendar years (default seven: the same
date seven years earlier, 29 February falling back to 28 February). **Nothing in the product
deletes events** and pruning is not implemented: there is no setting that turns it on. Ranges
can be archived (evidence bundles with their digests, console recordings and the files of
earlier exports); legal holds are events, placed and released through ``audit.commands``, and
are listed in every report, archive manifest and the retention status.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.conf import settings

from audit.hashing import format_time
from audit.models import Event, ExportJob
from audit.store import iter_events

__all__ = ["LegalHold", "PRUNING", "cutoff", "legal_holds", "status", "summary", "years_before"]

PRUNING = "not implemented: no event, digest, recording or export is ever deleted by the product"
HOLD_TYPES = frozenset({"audit.legal_hold_placed", "audit.legal_hold_released"})


def years_before(moment: datetime, years: int) -> datetime:
    """The same calendar date ``years`` earlier (29 February -> 28 February)."""
    try:
        return moment.replace(year=moment.year - years)
    except ValueError:
        return moment.replace(year=moment.year - years, day=28)


def cutoff(now: datetime | None = None) -> datetime:
    """Events recorded before this instant are beyond retention."""
    return years_before(now or datetime.now(UTC), int(settings.SANDBOX_AUDIT_RETENTION_YEARS))


@dataclass
class LegalHold:
    hold_id: str
    reason: str
    placed_at: str
    placed_by: str
    position: int
    released_at: str | None = None
    released_by: str = ""

    @property
    def active(self) -> bool:
        return self.released_at is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "hold_id": self.hold_id,
            "reason": self.reason,
            "placed_at": self.placed_at,
            "placed_by": self.placed_by,
            "position": self.position,
            "released_at": self.released_at,
            "released_by": self.released_by,
            "active": self.active,
        }


def legal_holds(until: datetime | None = None) -> list[LegalHold]:
    """Every hold recorded (before ``until``), folded from its events, oldest first."""
    holds: dict[str, LegalHold] = {}
    for batch in iter_events(0, types=HOLD_TYPES):
        for e in batch:
            if until is not None and e.recorded_at >= until:
                return list(holds.values())
            d = e.data
            hold_id = str(d.get("hold_id", ""))
            if e.type == "audit.legal_hold_placed":
                holds[hold_id] = LegalHold(
                    hold_id,
                    str(d.get("reason", "")),
                    format_time(e.recorded_at),
                    e.actor_name,
                    e.position,
                )
            elif hold_id in holds and holds[hold_id].active:
                holds[hold_id].released_at = format_time(e.recorded_at)
                holds[hold_id].released_by = e.actor_name
    return list(holds.values())


def summary(*, oldest_event_at: datetime | None, now: datetime | None = None) -> dict[str, Any]:
    """The retention facts a report or manifest states."""
    limit = cutoff(now)
    return {
        "years": int(settings.SANDBOX_AUDIT_RETENTION_YEARS),
        "cutoff": format_time(limit),
        "oldest_event_at": format_time(oldest_event_at) if oldest_event_at else None,
        "events_beyond_retention": bool(oldest_event_at and oldest_event_at < limit),
        "pruning": PRUNING,
        "legal_holds": [h.as_dict() for h in legal_holds() if h.active],
    }


def status() -> dict[str, Any]:
    """Retention status for the API and dashboard: the summary plus every hold and archive."""
    oldest = Event.objects.order_by("position").values_list("recorded_at", flat=True).first()
    out = summary(oldest_event_at=oldest)
    out["legal_holds"] = [h.as_dict() for h in legal_holds()]
    out["archives"] = [
        {
            "job": str(j.id),
            "file": j.file_name,
            "before": j.params.get("until"),
            "first_position": j.first_position,
            "last_position": j.last_position,
            "sha256": j.sha256,
            "size": j.size,
            "finished_at": format_time(j.finished_at) if j.finished_at else None,
        }
        for j in ExportJob.objects.filter(
            kind=ExportJob.Kind.ARCHIVE, status=ExportJob.Status.DONE
        ).order_by("finished_at")
    ]
    return out
