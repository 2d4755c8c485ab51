"""API plumbing shared by every app: the exception handler mapping domain errors to HTTP.

400 with field errors for bad input, 403 with the named quota on a quota refusal, 404, 409 with
the current state or version on a conflict, 503 when the audit log or a guest cannot be reached.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from audit.digests import ChainBroken
from audit.errors import ConcurrencyError, EventStoreUnavailable


def _validation_body(exc: DjangoValidationError) -> Any:
    if hasattr(exc, "error_dict"):
        return exc.message_dict
    return {"detail": exc.messages}


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    from vms.commands import InvalidState, NotFound
    from vms.guest import GuestUnavailable
    from vms.quotas import QuotaExceeded

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
        from vms.agent.client import AgentError, AgentTimeout

        if isinstance(exc, AgentTimeout):
            return Response(
                {"detail": f"the guest agent timed out: {exc}"},
                status=status.HTTP_504_GATEWAY_TIMEOUT,
            )
        if isinstance(exc, AgentError):
            return Response(
                {"detail": f"the guest agent refused: {exc}"}, status=status.HTTP_502_BAD_GATEWAY
            )
    return response
