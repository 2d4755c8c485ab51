"""Failed password logins per source address, counted in Django's cache.

An address that fails ``SANDBOX_LOGIN_SOURCE_FAILURES`` logins within a window of
``SANDBOX_LOGIN_SOURCE_WINDOW_S`` seconds is refused for the next window, before any username is
looked up or any password hashed. The counters live in the cache: Redis when ``REDIS_URL`` is set
(shared by every web process), else the process's memory (the embedded default serves from one
web process). They are counters, not records: what the log keeps is decided in
``accounts.commands.record_login_failure``.

Addresses are counted by ``source_key``: an IPv4-mapped IPv6 address as its IPv4 address, any
other IPv6 address by its network of ``SANDBOX_LOGIN_SOURCE_IPV6_PREFIX`` bits (64: one holder of
a /64 cannot rotate past the limit).

Attempts are counted *before* a password is checked (``reserve``, ``reserve_name``), so that
parallel attempts cannot all pass a check made before any of them failed: an address has
``SANDBOX_LOGIN_SOURCE_FAILURES`` attempt slots a window, a username ``SANDBOX_LOCKOUT_THRESHOLD``
until its lock or a login resets them; a successful login gives its slot back.

Every username, real or made up, counts its checked failures here by one rule
(``note_name_failure``: a window of ``SANDBOX_LOCKOUT_WINDOW_S`` from its first failure) and locks
at ``SANDBOX_LOCKOUT_THRESHOLD`` of them. A real account's lock is an ``auth.locked_out`` event;
a made-up name locks from the outside (``note_unknown_name_failure``, ``name_locked_until``),
without an event per name. The same failures lead to the same answer.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from django.conf import settings
from django.core.cache import cache

__all__ = [
    "Tally",
    "clear_name",
    "forget",
    "lift",
    "name_locked_until",
    "note_failure",
    "note_name_failure",
    "note_unknown_name_failure",
    "once_per",
    "refused_until",
    "release",
    "reserve",
    "reserve_name",
    "source_key",
]

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


def source_key(ip: str | None) -> str | None:
    """What an address is counted as: IPv4 as is, an IPv4-mapped IPv6 address as its IPv4
    address, other IPv6 addresses by their /``SANDBOX_LOGIN_SOURCE_IPV6_PREFIX`` network."""
    if not ip:
        return None
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        prefix = int(getattr(settings, "SANDBOX_LOGIN_SOURCE_IPV6_PREFIX", 64))
        return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))
    return str(addr)


def _window_s() -> int:
    return max(1, int(settings.SANDBOX_LOGIN_SOURCE_WINDOW_S))


def refused_until(source: str | None) -> datetime | None:
    """When ``source`` may try again, if it is refused now."""
    source = source_key(source)
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


def _decr(key: str) -> None:
    try:
        cache.decr(key)
    except ValueError:  # expired meanwhile: nothing left to give back
        pass


def reserve(source: str | None) -> tuple[str | None, datetime | None]:
    """Take one of ``source``'s attempt slots of this window, before its password is checked.

    Returns the slot (give it back with ``release`` when the login succeeds; a failure keeps it)
    and, when every slot is taken, the end of the window instead (nothing is taken then).
    """
    source = source_key(source)
    if not source:
        return None, None
    window_s = _window_s()
    window = int(_clock() // window_s)
    slot = _key("slots", source, window)
    if _incr(slot, 2 * window_s) > settings.SANDBOX_LOGIN_SOURCE_FAILURES:
        _decr(slot)
        return None, datetime.fromtimestamp((window + 1) * window_s, tz=UTC)
    return slot, None


def release(slot: str | None) -> None:
    """Give back a slot of ``reserve`` or ``reserve_name`` (the attempt succeeded)."""
    if slot:
        _decr(slot)


def _name(name: str) -> str:
    # Any text may be typed as a username: key on its digest.
    return hashlib.sha256(name.encode()).hexdigest()[:32]


def reserve_name(name: str) -> tuple[str | None, bool]:
    """Take one of the username's attempt slots before its password is checked: False when the
    lockout threshold is taken already (by failures, or attempts still being checked)."""
    key = _key("name-slots", _name(name))
    if _incr(key, int(settings.SANDBOX_LOCKOUT_WINDOW_S)) > settings.SANDBOX_LOCKOUT_THRESHOLD:
        _decr(key)
        return None, False
    return key, True


def clear_name(name: str) -> None:
    """The username logged in, was locked or unlocked: its slots count from zero again."""
    cache.delete_many([_key("name-slots", _name(name)), _key("name-failures", _name(name))])


def note_name_failure(name: str) -> int:
    """Count a checked failure of a username, real or made up, and return its failures in the
    current window: one rule for every name, so that when a name locks says nothing about whether
    it exists. The window opens at the name's first failure and lasts ``SANDBOX_LOCKOUT_WINDOW_S``
    (the key expires with it); a lock, an unlock or a login closes it (``clear_name``). Attempts
    refused while the name is locked are not failures and never come here."""
    return _incr(_key("name-failures", _name(name)), int(settings.SANDBOX_LOCKOUT_WINDOW_S))


def note_unknown_name_failure(name: str) -> datetime | None:
    """Count a failure for a username that does not exist; at the lockout threshold it is
    refused, as a real one would be (without an event: random names would fill the log)."""
    if note_name_failure(name) < settings.SANDBOX_LOCKOUT_THRESHOLD:
        return None
    until = _clock() + int(settings.SANDBOX_LOCKOUT_S)
    cache.set(_key("name-locked", _name(name)), until, timeout=int(settings.SANDBOX_LOCKOUT_S))
    clear_name(name)
    return datetime.fromtimestamp(until, tz=UTC)


def name_locked_until(name: str, now: datetime | None = None) -> datetime | None:
    """When a made-up username's outside lock ends, if it is locked now."""
    until = cache.get(_key("name-locked", _name(name)))
    if until is None:
        return None
    end = datetime.fromtimestamp(float(until), tz=UTC)
    return end if end > (now or datetime.now(tz=UTC)) else None


def once_per(seconds: int, *parts: object) -> bool:
    """True the first time in ``seconds`` for these parts, across every web process sharing the
    cache (one atomic add); give it back with ``forget`` if the thing it allowed failed."""
    return bool(cache.add(_key("once", *parts), 1, timeout=seconds))


def forget(*parts: object) -> None:
    cache.delete(_key("once", *parts))


def note_failure(source: str | None, *, unknown_user: bool) -> Tally:
    """Count a failed login from ``source`` in the current (fixed) window."""
    window_s = _window_s()
    source = source_key(source)
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
    source = source_key(source)
    if source:
        cache.delete(_key("refused", source))
