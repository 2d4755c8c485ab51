"""Who the client is: the peer's address, unless the peer is a configured reverse proxy.

``X-Forwarded-For`` and ``X-Forwarded-Proto`` are written by whoever sends the request; they
say something only when a proxy we trust wrote them. The servers' own switches for this
(daphne's ``--proxy-headers`` trusted everyone; uvicorn trusts 127.0.0.1 by default) are off in
every serving mode, and this ASGI middleware, wrapped around the whole application (HTTP and
websockets), applies ``SANDBOX_TRUSTED_PROXIES`` instead, with uvicorn's parser: the client is
the right-most forwarded address that is not itself a trusted proxy. Nobody is trusted by
default. Audit events (``source_ip``), token IP allow-lists, the /metrics allow-list and
``request.is_secure()`` all read the address and scheme this leaves in the scope.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

__all__ = ["TrustedProxyHeaders"]


class TrustedProxyHeaders:
    """ASGI middleware: forwarded headers believed only from ``SANDBOX_TRUSTED_PROXIES``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._trusted: tuple[str, ...] = ()
        self._proxied: Any = None

    def _middleware(self, trusted: tuple[str, ...]) -> Any:
        if self._proxied is None or trusted != self._trusted:  # settings changed (tests)
            self._trusted = trusted
            self._proxied = ProxyHeadersMiddleware(self.app, trusted_hosts=list(trusted))
        return self._proxied

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        trusted = tuple(settings.SANDBOX_TRUSTED_PROXIES)
        if trusted and scope["type"] in ("http", "websocket"):
            await self._middleware(trusted)(scope, receive, send)
        else:
            await self.app(scope, receive, send)
