"""The preview proxy: ``{port}-{vm_id}.<SANDBOX_PREVIEW_DOMAIN>`` served from the guest.

An ASGI middleware in front of the whole application (``sandbox_site.asgi``): a request or
websocket whose Host is under the preview domain never reaches Django or Channels; every other
one passes through untouched. Who may pass, and the guest's address (from the VM's record only),
is decided by ``vms.preview_access``; this module moves the bytes:

- HTTP with httpx, streamed both ways (no whole body is held), redirects never followed,
  connect and read timeouts, proxies from the environment ignored;
- websockets with the ``websockets`` client, messages relayed both ways, close codes kept.

Both connect from the namespace guests are routed from (``sandbox_site.upstream``).

What the guest never sees: our API token (``Authorization: Bearer sbx_...``), the preview
cookie, the dashboard's session and CSRF cookies, the grant in the URL, hop-by-hop headers,
and the client's own ``X-Forwarded-*``/``Forwarded`` (replaced by ours). What the guest may not
set: our cookies, or a cookie with a Domain (that would reach other VMs' preview hosts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, unquote_plus

import httpx
from channels.db import database_sync_to_async
from django.conf import settings
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from sandbox_site import upstream
from vms import preview_access, previews

__all__ = ["PreviewRouter"]

log = logging.getLogger("sandbox.preview")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

MAX_HEADERS = 100
# Never forwarded either way (RFC 9110 7.6.1), plus what a proxy must replace.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
REPLACED = frozenset(
    {b"host", b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto"}
    | {b"x-forwarded-port", b"x-real-ip"}
)


class PreviewRouter:
    """ASGI middleware: preview hosts to the guest, everything else to ``app``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient]
        self._clients = weakref.WeakKeyDictionary()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not settings.SANDBOX_PREVIEW_DOMAIN:
            await self.app(scope, receive, send)
            return
        hosts = [v for k, v in scope.get("headers") or [] if k == b"host"]
        host = _hostname(hosts[0]) if len(hosts) == 1 else ""
        domain = settings.SANDBOX_PREVIEW_DOMAIN
        if host != domain and not host.endswith("." + domain):
            if len(hosts) > 1:  # two Host headers: nobody can say which site this is for
                await _refuse(scope, receive, send, 400, "Exactly one Host header, please.")
                return
            await self.app(scope, receive, send)
            return
        await _Exchange(self, scope, receive, send, hosts[0].decode("latin-1")).run()

    def client(self) -> httpx.AsyncClient:
        """One connection pool per event loop (tests run several)."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            connect_s = settings.SANDBOX_PREVIEW_CONNECT_TIMEOUT_S
            read_s = settings.SANDBOX_PREVIEW_READ_TIMEOUT_S
            client = httpx.AsyncClient(
                transport=upstream.GuestTransport(
                    httpx.Limits(max_connections=200, max_keepalive_connections=20)
                ),
                timeout=httpx.Timeout(connect=connect_s, read=read_s, write=read_s, pool=connect_s),
                follow_redirects=False,
                trust_env=False,  # no HTTP_PROXY, no .netrc: straight to the guest
            )
            self._clients[loop] = client
        return client


def _hostname(raw: bytes) -> str:
    """The Host header's name, lower-cased, without port ("" if it is not one)."""
    try:
        host = raw.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return ""
    if host.startswith("["):
        return ""  # an IPv6 literal is never a preview host
    host = host.rsplit(":", 1)[0] if ":" in host else host
    return host.removesuffix(".")  # "a.example." is "a.example" (as Django has it)


class _Exchange:
    """One request or websocket on a preview host."""

    def __init__(
        self, router: PreviewRouter, scope: Scope, receive: Receive, send: Send, host: str
    ) -> None:
        self.router, self.scope, self.receive, self.send = router, scope, receive, send
        self.host = host  # as the client sent it, port included
        self.websocket = scope["type"] == "websocket"
        self.secure = scope.get("scheme") in ("https", "wss")

    async def run(self) -> None:
        scope = self.scope
        if self.websocket:
            message = await self.receive()
            if message["type"] != "websocket.connect":
                return
        named = previews.parse_host(_hostname(self.host.encode("latin-1")))
        if named is None:
            await self.refuse(404, "No such preview: the host names no VM and port.")
            return
        port, vm_id = named
        headers = scope.get("headers") or []
        if len(headers) > MAX_HEADERS or sum(len(k) + len(v) for k, v in headers) > (
            settings.SANDBOX_PREVIEW_MAX_HEADER_BYTES
        ):
            await self.refuse(431, "Request header fields too large.")
            return
        authorization = ""
        cookies: list[tuple[str, str]] = []
        for key, value in headers:
            if key == b"authorization" and previews.is_our_authorization(value.decode("latin-1")):
                authorization = value.decode("latin-1")
            elif key == b"cookie":
                cookies += _parse_cookies(value.decode("latin-1"))
        url_grants, self.forward_query = _take_grant(scope.get("query_string", b""))
        ours = {previews.cookie_name(self.secure)}
        client = scope.get("client") or (None, None)
        try:
            access = await database_sync_to_async(preview_access.authorize)(
                vm_id,
                port,
                method="GET" if self.websocket else scope["method"],
                websocket=self.websocket,
                client_ip=client[0],
                authorization=authorization,
                url_grant=url_grants[0] if len(url_grants) == 1 else "",
                cookie_grants=tuple(v for k, v in cookies if k in ours),
            )
        except preview_access.Refused as exc:
            await self.refuse(exc.status, exc.message)
            return
        self.access = access
        if url_grants and not self.websocket and scope["method"] in ("GET", "HEAD"):
            # A link was opened: keep the grant in a cookie and take it out of the address bar
            # (and so out of the guest's logs, the Referer and the history).
            location = scope.get("raw_path") or quote(scope.get("path", "/")).encode("latin-1")
            if self.forward_query:
                location += b"?" + self.forward_query
            await self.respond(303, "", [(b"location", location)])
            return
        if self.websocket:
            origin = _header(headers, b"origin")
            expected = ("https://" if self.secure else "http://") + self.host.lower()
            if access.by_cookie and origin is not None and origin.lower() != expected:
                # The cookie is ambient: only the preview's own pages may use it for a socket.
                await self.refuse(403, "Cross-origin websocket to a preview.")
                return
            await self.relay_websocket(headers)
        else:
            await self.relay_http(headers)

    # --- Answers of our own ---------------------------------------------------------------

    def cookie_header(self) -> list[tuple[bytes, bytes]]:
        if not self.access.set_cookie:
            return []
        parts = [
            f"{previews.cookie_name(self.secure)}={self.access.set_cookie}",
            "Path=/",
            f"Max-Age={self.access.cookie_max_age}",
            "HttpOnly",
            "SameSite=Lax",
        ]
        if self.secure:
            parts.append("Secure")
        return [(b"set-cookie", "; ".join(parts).encode("latin-1"))]

    async def respond(
        self, status: int, text: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        body = (text + "\n").encode() if text else b""
        await self.send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                    *(headers or []),
                    *self.cookie_header(),
                ],
            }
        )
        await self.send({"type": "http.response.body", "body": body})

    async def refuse(self, status: int, message: str) -> None:
        self.access = preview_access.Access("", 0)
        await _refuse(self.scope, self.receive, self.send, status, message, started=True)

    # --- HTTP -----------------------------------------------------------------------------

    async def relay_http(self, headers: list[tuple[bytes, bytes]]) -> None:
        scope = self.scope
        forwarded = self.forward_headers(headers)
        has_body = any(k in (b"content-length", b"transfer-encoding") for k, _ in headers)
        body_done = asyncio.Event()
        raw_path = scope.get("raw_path") or quote(scope.get("path", "/")).encode("latin-1")
        if self.forward_query:
            raw_path += b"?" + self.forward_query
        request = self.router.client().build_request(
            scope["method"],
            httpx.URL(scheme="http", host=self.access.ip, port=self.access.port, raw_path=raw_path),
            headers=forwarded,
            content=self.request_body(body_done) if has_body else None,
        )
        if not has_body:
            body_done.set()
        try:
            response = await self.router.client().send(request, stream=True)
        except httpx.ConnectTimeout:
            await self.respond(504, "The guest did not accept the connection in time.")
            return
        except httpx.TimeoutException:
            await self.respond(504, "The guest did not answer in time.")
            return
        except _ClientGone:
            return
        except httpx.HTTPError as exc:
            log.info("preview: guest %s:%s failed: %r", self.access.ip, self.access.port, exc)
            await self.respond(502, "The guest's service could not be reached.")
            return
        try:
            out = self.response_headers(response.headers.raw)
            if out is None:
                await self.respond(502, "The guest's response headers are too large.")
                return
            await self.send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": out + self.cookie_header(),
                }
            )
            await self.stream_response(response, body_done)
        finally:
            await response.aclose()

    async def request_body(self, done: asyncio.Event) -> AsyncIterator[bytes]:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                done.set()
                return

    async def stream_response(self, response: httpx.Response, body_done: asyncio.Event) -> None:
        """The guest's body to the client as it comes; stops when the client goes away."""

        async def pump() -> None:
            async for chunk in response.aiter_raw():
                await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
            await self.send({"type": "http.response.body", "body": b""})

        async def client_gone() -> None:
            if not body_done.is_set():
                await asyncio.Event().wait()  # the request body is still being read
            while (await self.receive())["type"] != "http.disconnect":
                pass

        relay = asyncio.ensure_future(pump())
        watch = asyncio.ensure_future(client_gone())
        try:
            await asyncio.wait({relay, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (relay, watch):
                task.cancel()
            for task in (relay, watch):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if relay.done() and not relay.cancelled() and relay.exception() is not None:
            # Cut off mid-body: the status is sent, so the connection must drop, or a truncated
            # body would look complete.
            raise _GuestBroke from relay.exception()

    # --- Headers --------------------------------------------------------------------------

    def forward_headers(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        named = {
            n.strip().lower().encode("latin-1")
            for k, v in headers
            if k == b"connection"
            for n in v.decode("latin-1").split(",")
        }
        dropped = HOP_BY_HOP | REPLACED | named
        hidden = {previews.cookie_name(True), previews.cookie_name(False)}
        hidden |= {settings.SESSION_COOKIE_NAME, settings.CSRF_COOKIE_NAME}
        out: list[tuple[bytes, bytes]] = []
        for key, value in headers:
            if key in dropped or key.startswith(b"sec-websocket-"):
                continue
            if key == b"authorization" and previews.is_our_authorization(value.decode("latin-1")):
                continue
            if key == b"cookie":
                kept = [
                    (n, v) for n, v in _parse_cookies(value.decode("latin-1")) if n not in hidden
                ]
                if kept:
                    out.append((b"cookie", "; ".join(f"{n}={v}" for n, v in kept).encode()))
                continue
            out.append((key, value))
        client = self.scope.get("client") or (None, None)
        proto = "https" if self.secure else "http"
        if not self.websocket:
            out.append((b"host", self.host.encode("latin-1")))
        out += [
            (b"x-forwarded-host", self.host.encode("latin-1")),
            (b"x-forwarded-proto", proto.encode()),
        ]
        if client[0]:
            out.append((b"x-forwarded-for", str(client[0]).encode("latin-1")))
        return out

    def response_headers(
        self, headers: list[tuple[bytes, bytes]]
    ) -> list[tuple[bytes, bytes]] | None:
        if len(headers) > MAX_HEADERS or sum(len(k) + len(v) for k, v in headers) > (
            settings.SANDBOX_PREVIEW_MAX_HEADER_BYTES
        ):
            return None
        named = {
            n.strip().lower().encode("latin-1")
            for k, v in headers
            if k.lower() == b"connection"
            for n in v.decode("latin-1").split(",")
        }
        out = []
        for key, value in headers:
            key = key.lower()
            if key in HOP_BY_HOP or key in named:
                continue
            if key == b"set-cookie" and not _guest_cookie_allowed(value.decode("latin-1")):
                continue
            out.append((key, value))
        return out

    # --- Websockets -----------------------------------------------------------------------

    async def relay_websocket(self, headers: list[tuple[bytes, bytes]]) -> None:
        scope = self.scope
        path = scope.get("raw_path") or quote(scope.get("path", "/")).encode("latin-1")
        if self.forward_query:
            path += b"?" + self.forward_query
        host = self.access.ip if ":" not in self.access.ip else f"[{self.access.ip}]"
        uri = f"ws://{host}:{self.access.port}{path.decode('latin-1')}"
        # The client library writes Origin and User-Agent itself, from its arguments.
        forwarded = self.forward_headers(
            [(k, v) for k, v in headers if k not in (b"origin", b"user-agent")]
        )
        connect_s = settings.SANDBOX_PREVIEW_CONNECT_TIMEOUT_S
        try:
            sock = await upstream.connect(self.access.ip, self.access.port, connect_s)
            guest = await connect(
                uri,
                sock=sock,  # opened where guests are routed from (sandbox_site.upstream)
                origin=_header(headers, b"origin"),  # type: ignore[arg-type]
                subprotocols=scope.get("subprotocols") or None,
                additional_headers=[(k.decode(), v.decode("latin-1")) for k, v in forwarded],
                user_agent_header=_header(headers, b"user-agent"),
                proxy=None,
                open_timeout=connect_s,
                max_size=settings.SANDBOX_PREVIEW_WS_MAX_MESSAGE_BYTES,
                compression=None,
                ping_interval=None,  # the client and the guest keep their own connection alive
            )
        except TimeoutError:
            await self.refuse(504, "The guest did not accept the websocket in time.")
            return
        except InvalidStatus as exc:
            await self.refuse(502, f"The guest refused the websocket ({exc.response.status_code}).")
            return
        except ValueError as exc:
            # A redirect: never followed (the client library cannot, on a socket it was given).
            if not isinstance(exc.__cause__, InvalidStatus):
                raise
            status = exc.__cause__.response.status_code
            await self.refuse(502, f"The guest redirected the websocket ({status}).")
            return
        except (OSError, InvalidHandshake) as exc:
            log.info("preview: guest websocket %s failed: %r", uri, exc)
            await self.refuse(502, "The guest's websocket could not be reached.")
            return
        async with guest:
            await self.send({"type": "websocket.accept", "subprotocol": guest.subprotocol})
            await self.pump_websocket(guest)

    async def pump_websocket(self, guest: ClientConnection) -> None:
        async def to_guest() -> None:
            while True:
                message = await self.receive()
                if message["type"] == "websocket.disconnect":
                    await guest.close(code=_sendable(message.get("code", 1000)))
                    return
                if message.get("text") is not None:
                    await guest.send(message["text"])
                elif message.get("bytes") is not None:
                    await guest.send(message["bytes"])

        async def to_client() -> None:
            try:
                async for data in guest:
                    key = "text" if isinstance(data, str) else "bytes"
                    await self.send({"type": "websocket.send", key: data})
            except ConnectionClosed:
                pass
            await self.send(
                {"type": "websocket.close", "code": _sendable(guest.close_code or 1000)}
            )

        tasks = [asyncio.ensure_future(to_guest()), asyncio.ensure_future(to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed, OSError):
                    await task


class _ClientGone(Exception):
    """The client disconnected while its request body was being sent to the guest."""


class _GuestBroke(Exception):
    """The guest's connection failed after its response had started."""


def _take_grant(query: bytes) -> tuple[list[str], bytes]:
    """The grants in a query string, and the query string without them, the rest byte for byte
    as the client sent it (re-encoding would change what the guest's app reads)."""
    grants, kept = [], []
    for part in query.split(b"&") if query else []:
        name, _, value = part.partition(b"=")
        if unquote_plus(name.decode("latin-1")) == previews.QUERY_PARAM:
            grants.append(unquote_plus(value.decode("latin-1")))
        else:
            kept.append(part)
    return grants, b"&".join(kept)


def _sendable(code: int) -> int:
    """A close code that may go on the wire (1005/1006/1015 only report; they are not sent)."""
    return 1000 if code in (1005, 1006, 1015) or not 1000 <= code <= 4999 else code


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _parse_cookies(header: str) -> list[tuple[str, str]]:
    out = []
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name:
            out.append((name.strip(), value.strip()))
    return out


def _guest_cookie_allowed(set_cookie: str) -> bool:
    """A guest's cookie stays on its own preview host: none of our names, and no Domain (which
    would reach every VM's preview host under the domain)."""
    name = set_cookie.split("=", 1)[0].strip()
    ours = {previews.cookie_name(True), previews.cookie_name(False)}
    ours |= {settings.SESSION_COOKIE_NAME, settings.CSRF_COOKIE_NAME}
    if name in ours:
        return False
    attributes = [a.strip().lower() for a in set_cookie.split(";")[1:]]
    return not any(a.startswith("domain") for a in attributes)


async def _refuse(
    scope: Scope, receive: Receive, send: Send, status: int, message: str, started: bool = False
) -> None:
    """Answer with ``status`` and ``message``: a plain response, or for a websocket a refused
    handshake (the reason is logged)."""
    body = f"{message}\n".encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="preview"'))
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    if not started:
        message_in = await receive()
        if message_in["type"] != "websocket.connect":
            return
    # A close before the accept: the server answers the handshake with 403. (The ASGI
    # extension for an HTTP answer with our status makes uvicorn log an error each time.)
    await send({"type": "websocket.close", "code": 1008})
    log.info("preview websocket refused (%s): %s", HTTPStatus(status).phrase, message)
