"""HTTP for Django in threads, in lanes that never wait for each other's threads.

Django's own ASGI handler runs a sync view through three thread hops per request (the middleware
chain, back to the event loop, then the view); this runs the whole WSGI request in one worker
thread instead (a2wsgi builds the environ and streams large request bodies), and a response
that fits in memory goes back to the event loop in one hop: about half the per-request
overhead. Websockets stay on Channels.

Three pools. A write (POST, PUT, PATCH, DELETE) may wait for the event store's lock while other
writes hold it; under a burst of writes those waits would otherwise take every thread of the
process, and reads, which need no lock, would queue behind them. Requests that wait on a guest
or stream a file (exec, file transfers, downloads) can take minutes and would hold either lane's
threads meanwhile: they have the third lane.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import io
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from a2wsgi.wsgi import Body, build_environ


class ClientDisconnected(OSError):
    """The client went away before sending the whole request body.

    An OSError, so Django's request reading turns it into ``UnreadablePostError`` and a parser
    fails instead of taking what came as the whole body (a2wsgi's ``Body`` treats
    ``http.disconnect`` as the end of the body: a cut-off upload was stored as complete).
    """


class _Body(Body):
    """a2wsgi's request body that raises ``ClientDisconnected`` on ``http.disconnect``."""

    def _receive_more_data(self) -> bytes:
        if not self._has_more:
            return b""
        receive: Any = self.receive  # an ASGI receive: a coroutine function
        message: dict[str, Any] = asyncio.run_coroutine_threadsafe(
            receive(), loop=self.loop
        ).result()
        if message["type"] != "http.request":
            self._has_more = False
            raise ClientDisconnected("the client went away before the end of the request body")
        self._has_more = message.get("more_body", False)
        return message.get("body", b"")


READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Paths that wait on a guest's agent or stream a file: the long lane.
LONG_PATH = re.compile(r"/(exec|files|download|cast)/?$")
# Request bodies up to this size are read on the event loop before the thread starts; larger
# or unsized ones are streamed to the app as it reads them.
BODY_PREREAD_LIMIT = 1 << 20
# Responses up to this size go back to the event loop whole, larger ones in chunks of at least
# STREAM_CHUNK bytes.
BUFFER_LIMIT = 1 << 20
STREAM_CHUNK = 1 << 16


def lane_threads() -> tuple[int, int, int]:
    """(read, write, long) threads per web process."""
    return (
        int(os.environ.get("SANDBOX_WEB_READ_THREADS", "4")),
        int(os.environ.get("SANDBOX_WEB_WRITE_THREADS", "2")),
        int(os.environ.get("SANDBOX_WEB_LONG_THREADS", "8")),
    )


class _Responder:
    """One request: the WSGI app runs in a lane's thread; a response that fits in memory
    comes back to the event loop once, whole (a2wsgi would hop threads for the status, every
    chunk and the end); a large or streaming one is sent chunk by chunk as it is produced."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Any) -> None:
        self.loop = loop
        self.send = send
        self.status = 500
        self.headers: list[tuple[bytes, bytes]] = []
        self.streaming = False

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Any:
        self.status = int(status.split(" ", 1)[0])
        self.headers = [(k.lower().encode("latin1"), v.encode("latin1")) for k, v in headers]
        return self._write

    def _write(self, chunk: bytes) -> None:  # the legacy write() callable: stream it
        self._stream(chunk)

    def _stream(self, chunk: bytes) -> None:
        if not self.streaming:
            self.streaming = True
            self._call(
                {"type": "http.response.start", "status": self.status, "headers": self.headers}
            )
        self._call({"type": "http.response.body", "body": chunk, "more_body": True})

    def _call(self, message: dict[str, Any]) -> None:
        asyncio.run_coroutine_threadsafe(self.send(message), self.loop).result()

    def run(self, app: Any, environ: Any) -> bytes | None:
        """In the lane's thread: the whole body, or None once it has been streamed."""
        iterable = app(environ, self.start_response)
        try:
            chunks: list[bytes] = []
            size = 0
            for chunk in iterable:
                chunks.append(chunk)
                size += len(chunk)
                # Buffered whole up to BUFFER_LIMIT; past it, sent in STREAM_CHUNK pieces
                # (a file comes in 4 KiB blocks: one thread hop each would be slow).
                if size > (STREAM_CHUNK if self.streaming else BUFFER_LIMIT):
                    self._stream(b"".join(chunks))
                    chunks, size = [], 0
            if self.streaming:
                if chunks:
                    self._stream(b"".join(chunks))
                self._call({"type": "http.response.body", "body": b""})
                return None
            return b"".join(chunks)
        finally:
            close = getattr(iterable, "close", None)
            if close is not None:
                close()


class Lane:
    """A thread pool running a WSGI app for ASGI HTTP requests."""

    def __init__(self, wsgi_app: Any, threads: int, name: str) -> None:
        self.app = wsgi_app
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            body = await _preread(scope, receive)
        except ClientDisconnected:
            return  # nobody to answer, and no request to act on
        if body is None:
            wsgi_input: Any = _Body(loop, receive)
        else:
            wsgi_input = io.BytesIO(body)
        environ = build_environ(scope, wsgi_input)  # type: ignore[arg-type]
        responder = _Responder(loop, send)
        context = contextvars.copy_context()
        job = functools.partial(context.run, responder.run, self.app, environ)
        content = await loop.run_in_executor(self.executor, job)
        if content is not None:
            await send(
                {
                    "type": "http.response.start",
                    "status": responder.status,
                    "headers": responder.headers,
                }
            )
            await send({"type": "http.response.body", "body": content})


async def _preread(scope: dict[str, Any], receive: Any) -> bytes | None:
    """The whole body when it is announced and small (no thread hop per read), else None;
    ``ClientDisconnected`` when the client goes away before its end."""
    length = None
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
            break
    if length is None:
        return b"" if scope.get("method") in READ_METHODS else None
    if length > BODY_PREREAD_LIMIT:
        return None
    parts = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnected("the client went away before the end of the request body")
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)


class Lanes:
    """ASGI application serving a WSGI app's HTTP requests from the read, write and long
    thread pools."""

    def __init__(self, wsgi_app: Any) -> None:
        reads, writes, long = lane_threads()
        self.reads = Lane(wsgi_app, reads, "http-read")
        self.writes = Lane(wsgi_app, writes, "http-write")
        self.long = Lane(wsgi_app, long, "http-long")

    def lane_for(self, scope: dict[str, Any]) -> Lane:
        if LONG_PATH.search(scope.get("path", "")):
            return self.long
        return self.reads if scope.get("method") in READ_METHODS else self.writes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.lane_for(scope)(scope, receive, send)


def warm_database() -> None:
    """Open this process's connection pool before the first request rather than during it.

    A new PostgreSQL connection costs milliseconds (and its first queries more, while the
    backend fills its caches): opened on demand, the first second under load queued behind
    them. The pool (shared by the process's threads) keeps ``SANDBOX_DB_POOL_MIN`` connections
    open from here on. In a thread of its own: the server imports this module from its event
    loop, where Django refuses database work, and startup need not wait.
    """
    from django.conf import settings

    if settings.TESTING:  # a test imports the app before it has switched to the test database
        return
    threading.Thread(target=_touch_database, name="db-warmup", daemon=True).start()


def _touch_database() -> None:
    import logging

    from django.db import connection

    try:
        connection.ensure_connection()
    except Exception:  # the database may come up later: the first request will retry
        logging.getLogger(__name__).warning("database not reachable at start", exc_info=True)
    finally:
        connection.close()


def tune_interpreter() -> None:
    """A shorter GIL switch interval for the web process.

    A thread that gets a database reply waits for the GIL until the running thread gives it up,
    by default after up to 5 ms. A command makes a dozen round trips while it holds the event
    store's lock, so under load those waits stretched the lock to tens of milliseconds and the
    writes behind it queued; at 0.5 ms the lock is held for about the command's own work.
    """
    sys.setswitchinterval(float(os.environ.get("SANDBOX_GIL_SWITCH_S", "0.0005")))
