"""Failed password logins per source address, counted in Django's cache.

An address that fails ``SANDBOX_LOGIN_SOURCE_FAILURES`` logins within a window of
``SANDBOX_LOGIN_SOURCE_WINDOW_S`` seconds is refused for the next window, before any username is
looked up or any password hashed. The counters live in the cache: Redis when ``REDIS_URL`` is set
(shared by every web process), else the process's memory (the embedded default serves from one
web process). They are counters, not records: what the log keeps is decided in
``accounts.commands.record_login_failure``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from django.conf import settings
from django.core.cache import cache

__all__ = ["Tally", "lift", "note_failure", "refused_until"]

# Changed by tests so that each test counts from zero (the cache outlives a test).
NAMESPACE = "login-throttle"


@dataclass(frozen=True)
class Tally:
    """Failures from one address in the current window, after counting one more."""

    failures: int
    unknown_user_failures: int
    window_s: int
    # Set when this failure reached the limit: the address is refused until then. Exactly one
    # failure per window trips it (an atomic add), so one event can say so.
    refused_until: datetime | None = None
    # On the first unknown-username failure of a window: the previous window's total of them,
    # when more than its first one were left unrecorded (no refusal event carried the count).
    previous_window_unknown_user_failures: int = 0


def _clock() -> float:
    return time.time()


def _key(*parts: object) -> str:
    return ":".join([NAMESPACE, *(str(p) for p in parts)])


def refused_until(source: str | None) -> datetime | None:
    """When ``source`` may try again, if it is refused now."""
    if not source:
        return None
    until = cache.get(_key("refused", source))
    if until is None:
        return None
    end = datetime.fromtimestamp(float(until), tz=UTC)
    return end if end > datetime.now(tz=UTC) else None


def _incr(key: str, timeout: int) -> int:
    cache.add(key, 0, timeout=timeout)
    try:
        return int(cache.incr(key))
    except ValueError:  # expired between add and incr
        cache.add(key, 1, timeout=timeout)
        return 1


def note_failure(source: str | None, *, unknown_user: bool) -> Tally:
    """Count a failed login from ``source`` in the current (fixed) window."""
    window_s = max(1, int(settings.SANDBOX_LOGIN_SOURCE_WINDOW_S))
    if not source:
        return Tally(0, 0, window_s)
    now = _clock()
    window = int(now // window_s)
    failures = _incr(_key("failures", source, window), 2 * window_s)
    unknown = cache.get(_key("unknown", source, window), 0)
    previous = 0
    if unknown_user:
        unknown = _incr(_key("unknown", source, window), 2 * window_s)
        if unknown == 1 and not cache.get(_key("reported", source, window - 1)):
            count = int(cache.get(_key("unknown", source, window - 1), 0))
            previous = count if count > 1 else 0
    tripped = None
    if failures >= settings.SANDBOX_LOGIN_SOURCE_FAILURES:
        until = now + window_s
        if cache.add(_key("refused", source), until, timeout=window_s):
            tripped = datetime.fromtimestamp(until, tz=UTC)
            cache.set(_key("reported", source, window), 1, timeout=2 * window_s)
    return Tally(failures, int(unknown), window_s, tripped, previous)


def lift(source: str | None) -> None:
    """End ``source``'s refusal now (its event could not be recorded)."""
    if source:
        cache.delete(_key("refused", source))
