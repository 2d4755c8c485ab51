"""API plumbing shared by every app: the exception handler mapping domain errors to HTTP.

400 with field errors for bad input, 403 with the named quota on a quota refusal, 404, 409 with
the current state or version on a conflict, 503 when the audit log or a guest cannot be reached.
A guest path the agent refuses (a directory, a missing parent) is the caller's error: 400 (404
for a missing file) with the agent's code. Errors are JSON whatever the request's Accept says
(the browsable API page would otherwise render them as HTML).
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import UnreadablePostError
from rest_framework import status
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from audit.digests import ChainBroken
from audit.errors import ConcurrencyError, EventStoreUnavailable
from vms.agent.client import AgentError, AgentTimeout
from vms.commands import InvalidState, NotFound
from vms.guest import GuestUnavailable
from vms.quotas import QuotaExceeded


def _validation_body(exc: DjangoValidationError) -> Any:
    if hasattr(exc, "error_dict"):
        return exc.message_dict
    return {"detail": exc.messages}


# Agent error codes that say what is wrong with the caller's path (docs/agent-protocol.md).
AGENT_PATH_ERRORS = frozenset(
    {"bad_request", "exists", "not_a_directory", "is_a_directory", "not_a_file"}
)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    response = _handle(exc, context)
    request = context.get("request")
    if response is not None and request is not None:
        # JSON whatever Accept asked for: DRF renders with the request's negotiated renderer.
        request.accepted_renderer = JSONRenderer()
        request.accepted_media_type = "application/json"
    return response


def _handle(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, EventStoreUnavailable):
        return Response(
            {"detail": "The audit log cannot record this action now; nothing was done."},
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
        )
    if isinstance(exc, ChainBroken):
        # The log's chain is broken: signing or exporting over it is refused (and recorded by
        # the command); the answer says where, as a conflict with the log's current state.
        return Response(
            {"detail": f"the audit chain is broken: {exc}"}, status=status.HTTP_409_CONFLICT
        )
    if isinstance(exc, ConcurrencyError):
        return Response(
            {
                "detail": str(exc),
                "aggregate": f"{exc.aggregate_type}:{exc.aggregate_id}",
                "expected_version": exc.expected_version,
                "current_version": exc.current_version,
            },
            status=status.HTTP_409_CONFLICT,
        )
    if isinstance(exc, DjangoValidationError):
        return Response(_validation_body(exc), status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, UnreadablePostError):
        # The body ended before its announced length (the client went away): nothing was done.
        return Response(
            {"detail": f"the request body is incomplete ({exc}); nothing was done"},
            status=status.HTTP_400_BAD_REQUEST,
        )
    if isinstance(exc, NotFound):
        return Response({"detail": str(exc)}, status=status.HTTP_404_NOT_FOUND)
    if isinstance(exc, InvalidState):
        return Response(
            {
                "detail": str(exc),
                "state": exc.vm.state,
                "pending": exc.vm.pending_type or None,
                "allowed_states": sorted(exc.allowed),
                "version": exc.vm.version,
            },
            status=status.HTTP_409_CONFLICT,
        )
    if isinstance(exc, QuotaExceeded):
        return Response(exc.as_dict(), status=status.HTTP_403_FORBIDDEN)
    if isinstance(exc, GuestUnavailable):
        return Response({"detail": str(exc)}, status=status.HTTP_503_SERVICE_UNAVAILABLE)
    response = drf_exception_handler(exc, context)
    if response is None:
        if isinstance(exc, AgentTimeout):
            return Response(
                {"detail": f"the guest agent timed out: {exc}"},
                status=status.HTTP_504_GATEWAY_TIMEOUT,
            )
        if isinstance(exc, AgentError) and exc.code in AGENT_PATH_ERRORS | {"not_found"}:
            return Response(
                {"detail": f"the guest refused the path: {exc.message}", "code": exc.code},
                status=(
                    status.HTTP_404_NOT_FOUND
                    if exc.code == "not_found"
                    else status.HTTP_400_BAD_REQUEST
                ),
            )
        if isinstance(exc, AgentError):
            return Response(
                {"detail": f"the guest agent refused: {exc}"}, status=status.HTTP_502_BAD_GATEWAY
            )
    return response
