"""Fixtures of the webhook tests: a real HTTP receiver on 127.0.0.1 run by the test, a port
where nothing listens (a dead receiver), fast retry settings, and pumping until a condition."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when it arrived


class Receiver:
    """A webhook receiver: records every POST; answers from ``answers`` in turn (status, body,
    extra headers), then ``default``; waits ``delay`` seconds before answering."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.answers: deque[tuple[int, bytes, dict[str, str]]] = deque()
        self.default: tuple[int, bytes, dict[str, str]] = (200, b"thanks", {})
        self.delay = 0.0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.requests.append(
                        Received(self.path, dict(self.headers), body, time.monotonic())
                    )
                    status, reply, extra = (
                        receiver.answers.popleft() if receiver.answers else receiver.default
                    )
                if receiver.delay:
                    time.sleep(receiver.delay)
                with contextlib.suppress(OSError):
                    self.send_response(status)
                    for k, v in extra.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/sandbox?token=receiver-own-token"

    def answer(self, *statuses: int) -> None:
        for status in statuses:
            self.answers.append((status, f"answer {status}".encode(), {}))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture
def dead_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/gone"


@pytest.fixture
def fast(settings: Any) -> Any:
    """Retries within a fraction of a second, few attempts, a short timeout."""
    settings.SANDBOX_WEBHOOK_BACKOFF_BASE_S = 0.05
    settings.SANDBOX_WEBHOOK_BACKOFF_MAX_S = 0.2
    settings.SANDBOX_WEBHOOK_MAX_ATTEMPTS = 3
    settings.SANDBOX_WEBHOOK_DISABLE_AFTER = 2
    settings.SANDBOX_WEBHOOK_TIMEOUT_S = 2.0
    return settings


@pytest.fixture
def pump_until() -> Callable[..., Any]:
    """Run the pump (what the worker runs) until ``predicate()`` holds."""
    from webhooks import dispatch

    def run(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "it") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            dispatch.pump(max_seconds=5)
            value = predicate()
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    return run


@pytest.fixture
def subscribe(make_user: Callable[..., Any]) -> Callable[..., Any]:
    """subscribe(url, types, user=None, **kwargs) -> Issued; by default an admin's subscription
    that may reach the receiver on 127.0.0.1 (allow_private)."""
    from accounts.caller import Caller
    from webhooks import commands

    admins: list[Any] = []

    def make(url: str, event_types: Any = ("*",), user: Any = None, **kwargs: Any) -> Any:
        if user is None:
            if not admins:
                admins.append(make_user("admin", "hook-admin"))
            user = admins[0]
            kwargs.setdefault("allow_private", True)
        return commands.subscribe(
            Caller.for_user(user, channel="api"), url=url, event_types=list(event_types), **kwargs
        )

    return make


# The VM suite's fixtures: a worker process on the test database (tests/webhooks/test_worker.py).
from tests.vms import conftest as _vms  # noqa: E402

vm_dirs, worker, worker_env = _vms.vm_dirs, _vms.worker, _vms.worker_env
