"""HTTP for Django in threads, in two lanes: reads and writes never wait for each other's threads.

Django's own ASGI handler runs a sync view through three thread hops per request (the middleware
chain, back to the event loop, then the view); this runs the whole WSGI request in one worker
thread instead (a2wsgi), about half the per-request overhead. Websockets stay on Channels.

Two pools, by method. A write (POST, PUT, PATCH, DELETE) may wait for the event store's lock
while other writes hold it; under a burst of writes those waits would otherwise take every
thread of the process, and reads, which need no lock, would queue behind them. With a lane of
their own, reads keep their threads whatever the writes are doing, and the reverse.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from a2wsgi import WSGIMiddleware

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def lane_threads() -> tuple[int, int]:
    """(read threads, write threads) per web process."""
    return (
        int(os.environ.get("SANDBOX_WEB_READ_THREADS", "4")),
        int(os.environ.get("SANDBOX_WEB_WRITE_THREADS", "2")),
    )


class Lanes:
    """ASGI application serving a WSGI app's HTTP requests from a read and a write thread pool."""

    def __init__(self, wsgi_app: Any) -> None:
        reads, writes = lane_threads()
        self.reads = WSGIMiddleware(wsgi_app, workers=reads)
        self.writes = WSGIMiddleware(wsgi_app, workers=writes)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        lane = self.reads if scope.get("method") in READ_METHODS else self.writes
        await lane(scope, receive, send)


def tune_interpreter() -> None:
    """A shorter GIL switch interval for the web process.

    A thread that gets a database reply waits for the GIL until the running thread gives it up,
    by default after up to 5 ms. A command makes a dozen round trips while it holds the event
    store's lock, so under load those waits stretched the lock to tens of milliseconds and the
    writes behind it queued; at 0.5 ms the lock is held for about the command's own work.
    """
    sys.setswitchinterval(float(os.environ.get("SANDBOX_GIL_SWITCH_S", "0.0005")))
