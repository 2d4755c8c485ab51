"""Per-request (or per-task) context carried in contextvars: request id, channel, source IP.

The middleware sets it for HTTP requests, consumers for websockets and tasks for worker jobs;
structured logs and appended events both read it, so one id ties a log line to its events.
"""

from __future__ import annotations

import contextvars
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

__all__ = ["RequestContext", "current", "new_request_id", "bind", "valid_request_id"]

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{8,64}$")


@dataclass(frozen=True)
class RequestContext:
    request_id: str | None = None
    channel: str = "system"
    source_ip: str | None = None


_current: contextvars.ContextVar[RequestContext] = contextvars.ContextVar(
    "sandbox_request_context",
    default=RequestContext(),  # noqa: B039 - frozen dataclass, immutable
)


def current() -> RequestContext:
    return _current.get()


def new_request_id() -> str:
    return uuid.uuid4().hex


def valid_request_id(value: str | None) -> bool:
    """A client-supplied X-Request-ID is kept only if it is short and plain."""
    return bool(value) and bool(_REQUEST_ID_RE.match(value or ""))


@contextmanager
def bind(**changes: object) -> Iterator[RequestContext]:
    ctx = replace(_current.get(), **changes)  # type: ignore[arg-type]
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)
