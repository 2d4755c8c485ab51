"""Who the client is: the peer's address, unless the peer is a configured reverse proxy.

``X-Forwarded-For`` and ``X-Forwarded-Proto`` are written by whoever sends the request; they
say something only when a proxy we trust wrote them. The servers' own switches for this
(daphne's ``--proxy-headers`` trusted everyone; uvicorn trusts 127.0.0.1 by default) are off in
every serving mode, and this ASGI middleware, wrapped around the whole application (HTTP and
websockets), applies ``SANDBOX_TRUSTED_PROXIES`` instead, with uvicorn's parser: the client is
the right-most forwarded address that is not itself a trusted proxy. Nobody is trusted by
default. Audit events (``source_ip``), token IP allow-lists, the /metrics allow-list and
``request.is_secure()`` all read the address and scheme this leaves in the scope.

A forwarded address is believed only if it is an IP address (uvicorn's parser takes any text):
anything else (garbage, a host name, an 80-character string) leaves the peer's address in the
scope and is logged, so the audit log's ``source_ip`` is always an address.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any, cast

from django.conf import settings
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

__all__ = ["TrustedProxyHeaders"]

log = logging.getLogger("sandbox.site")

_PEER = "sandbox.peer"  # the connecting peer, kept in the scope while the headers are applied


def _address(value: str) -> str | None:
    """``value`` as a normalised IP address without a zone, or None."""
    try:
        parsed = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.scope_id:
        return None
    return str(parsed)


class TrustedProxyHeaders:
    """ASGI middleware: forwarded headers believed only from ``SANDBOX_TRUSTED_PROXIES``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._trusted: tuple[str, ...] = ()
        self._proxied: Any = None

    def _middleware(self, trusted: tuple[str, ...]) -> Any:
        if self._proxied is None or trusted != self._trusted:  # settings changed (tests)
            self._trusted = trusted
            self._proxied = ProxyHeadersMiddleware(
                cast(Any, self._checked), trusted_hosts=list(trusted)
            )
        return self._proxied

    async def _checked(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """After the forwarded headers: a client that is not an IP address is not believed."""
        peer = scope.pop(_PEER, None)
        client = scope.get("client")
        if client is not None and client != peer:
            address = _address(str(client[0]))
            if address is None:
                log.warning(
                    "X-Forwarded-For from %s names no IP address (%r): the peer's address is used",
                    peer[0] if peer else None,
                    str(client[0])[:100],
                )
                scope["client"] = peer
            else:
                scope["client"] = (address, client[1])
        await self.app(scope, receive, send)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        trusted = tuple(settings.SANDBOX_TRUSTED_PROXIES)
        if trusted and scope["type"] in ("http", "websocket"):
            scope[_PEER] = scope.get("client")
            await self._middleware(trusted)(scope, receive, send)
        else:
            await self.app(scope, receive, send)
