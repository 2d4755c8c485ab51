"""PostgreSQL connection tuning that Django leaves on the table.

Django's psycopg backend loads every ``timestamptz`` through a pure-Python subclass of psycopg's
loader (to pin the time zone), bypassing psycopg's C loader: on the API's lists that was about a
tenth of a request's CPU. When the connection's zone is UTC, the C loader already returns
exactly what Django's would (aware datetimes in ``datetime.timezone.utc``), so it is installed
instead, behind a class that carries the ``timezone`` attribute Django checks for.
"""

from __future__ import annotations

import datetime
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


def install() -> None:
    connection_created.connect(use_c_timestamptz_loader, dispatch_uid="sandbox_c_tz_loader")
