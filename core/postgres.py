"""PostgreSQL connection tuning that Django leaves on the table, and fork safety.

Django's psycopg backend loads every ``timestamptz`` through a pure-Python subclass of psycopg's
loader (to pin the time zone), bypassing psycopg's C loader: on the API's lists that was about a
tenth of a request's CPU. When the connection's zone is UTC, the C loader already returns
exactly what Django's would (aware datetimes in ``datetime.timezone.utc``), so it is installed
instead, behind a class that carries the ``timezone`` attribute Django checks for.

A forked child (django-q2 forks its sentinel, pusher, monitor and workers) must not use a
connection or a pool of its parent: they share the parent's sockets, so two processes interleave
one protocol stream (``prepared statement "_pg3_0" already exists``, "the last operation didn't
produce records", half-open transactions), and the pool's maintenance threads do not exist in the
child. ``forget_inherited_connections`` runs in every forked child: it drops the inherited
connection wrappers and pools *without closing them* (closing would end the parent's sessions;
psycopg itself never finishes a connection of another process) so the child opens its own.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any

from django.db.backends.signals import connection_created


def _fast_utc_loader() -> tuple[type, int, Any] | None:
    try:
        import psycopg
        from psycopg.adapt import Loader
        from psycopg.pq import Format
    except ImportError:  # psycopg2, or no PostgreSQL driver at all
        return None
    oid = psycopg.adapters.types["timestamptz"].oid
    c_loader = psycopg.adapters.get_loader(oid, Format.TEXT)
    if c_loader is None or c_loader.__module__.startswith("psycopg."):
        return None  # no C extension: Django's loader is as fast as any

    class UTCTimestamptzLoader(Loader):
        timezone = datetime.UTC

        def __init__(self, oid: int, context: Any = None) -> None:
            super().__init__(oid, context)
            self.load = c_loader(oid, context).load  # type: ignore[method-assign,misc]

        def load(self, data: Any) -> Any:  # replaced per instance by the C loader's
            raise NotImplementedError

    return UTCTimestamptzLoader, oid, Format.TEXT


_FAST = _fast_utc_loader()


def use_c_timestamptz_loader(sender: Any, connection: Any, **kwargs: Any) -> None:
    if _FAST is None or connection.vendor != "postgresql":
        return
    if connection.timezone != datetime.UTC:
        return
    loader, oid, text = _FAST
    adapters = connection.connection.adapters
    if adapters.get_loader(oid, text) is not loader:
        adapters.register_loader("timestamptz", loader)


# What a forked child inherited and must neither use nor close: kept referenced so that no
# finalizer runs on it (a pool's would try to stop threads that do not exist in the child).
_inherited: list[Any] = []
_fork_hook_installed = False


def forget_inherited_connections() -> None:
    """In a forked child: start with no database connection and no pool of the parent's."""
    from asgiref.local import Local
    from django.db import connections

    handler: Any = connections  # its per-thread storage of wrappers is not in the stubs
    _inherited.append(handler._connections)  # every alias's wrapper of the forking thread
    handler._connections = Local(handler.thread_critical)
    backend = sys.modules.get("django.db.backends.postgresql.base")
    if backend is not None:  # not imported: no pool can exist
        pools = backend.DatabaseWrapper._connection_pools
        _inherited.extend(pools.values())
        pools.clear()


def install() -> None:
    global _fork_hook_installed
    connection_created.connect(use_c_timestamptz_loader, dispatch_uid="sandbox_c_tz_loader")
    if not _fork_hook_installed:
        os.register_at_fork(after_in_child=forget_inherited_connections)
        _fork_hook_installed = True
