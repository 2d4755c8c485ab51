"""Followed projection of the whole log into per-day activity counts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from audit import catalogue
from audit.models import ActivityCount
from audit.projections import Projector, register
from audit.store import RecordedEvent


@register
class ActivityProjector(Projector):
    name = "audit.activity"
    event_types = frozenset(t.name for t in catalogue.all_types())
    inline = False

    def handle(self, events: Sequence[RecordedEvent]) -> None:
        folded = Counter((e.recorded_at.date(), e.type, e.actor_name) for e in events)
        days = {k[0] for k in folded}
        existing = {
            (a.day, a.event_type, a.actor_name): a
            for a in ActivityCount.objects.filter(day__in=days)
        }
        new, changed = [], []
        for key, n in folded.items():
            row = existing.get(key)
            if row is None:
                new.append(ActivityCount(day=key[0], event_type=key[1], actor_name=key[2], count=n))
            else:
                row.count += n
                changed.append(row)
        ActivityCount.objects.bulk_create(new, batch_size=500)
        ActivityCount.objects.bulk_update(changed, ["count"], batch_size=500)

    def reset(self) -> None:
        ActivityCount.objects.all().delete()
