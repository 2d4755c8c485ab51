"""Recurring worker jobs, declared by each app and written idempotently after migrate."""

from __future__ import annotations


def ensure(jobs: list[tuple[str, str, int]]) -> None:
    """Create or update a django-q2 Schedule per ``(name, dotted function, every N minutes)``."""
    from django_q.models import Schedule

    for name, func, minutes in jobs:
        Schedule.objects.update_or_create(
            name=name,
            defaults={
                "func": func,
                "schedule_type": Schedule.MINUTES,
                "minutes": minutes,
                "repeats": -1,
            },
        )
