"""API plumbing shared by every app: the exception handler mapping domain errors to HTTP."""

from __future__ import annotations

from typing import Any

from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from audit.errors import ConcurrencyError, EventStoreUnavailable


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, EventStoreUnavailable):
        return Response(
            {"detail": "The audit log cannot record this action now; nothing was done."},
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
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
    return drf_exception_handler(exc, context)
