"""Request id, channel and source IP for every request; the event store's fail-closed answer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.response import TemplateResponse

from audit.errors import EventStoreUnavailable
from core import context
from sandbox_site import metrics

log = logging.getLogger("sandbox.request")


def client_ip(request: HttpRequest) -> str | None:
    # REMOTE_ADDR only, never X-Forwarded-For here: the ASGI application sets the client address
    # from forwarded headers only when the peer is in SANDBOX_TRUSTED_PROXIES
    # (sandbox_site/proxies.py), and REMOTE_ADDR comes from that.
    return request.META.get("REMOTE_ADDR") or None


class RequestContextMiddleware:
    """Binds the request id (from a valid X-Request-ID or new) and returns it as X-Request-ID."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        supplied = request.headers.get("X-Request-ID")
        request_id = supplied if context.valid_request_id(supplied) else context.new_request_id()
        channel = "api" if request.path.startswith("/api/") else "dashboard"
        request.request_id = request_id  # type: ignore[attr-defined]
        started = time.perf_counter()
        with context.bind(request_id=request_id, channel=channel, source_ip=client_ip(request)):
            response = self.get_response(request)
            elapsed = time.perf_counter() - started
            metrics.observe_request(request, response, elapsed)
            if response.status_code >= 500:
                log.error(
                    "request failed",
                    extra={"path": request.path, "status": response.status_code},
                )
        response["X-Request-ID"] = request_id
        return response


class EventStoreUnavailableMiddleware:
    """Fail closed: an action whose request event cannot be recorded is refused with 503."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not isinstance(exception, EventStoreUnavailable):
            return None
        log.error("event store unavailable: action refused", extra={"reason": str(exception)})
        if request.path.startswith("/api/") or "application/json" in request.headers.get(
            "Accept", ""
        ):
            return JsonResponse(
                {"detail": "The audit log cannot record this action now; nothing was done."},
                status=503,
            )
        return TemplateResponse(request, "errors/503.html", {"reason": str(exception)}, status=503)
