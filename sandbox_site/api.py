"""API plumbing shared by every app: the exception handler mapping domain errors to HTTP.

The mapping itself is ``vms.errors`` (the dashboard's JSON views answer with the same one).
Errors are JSON whatever the request's Accept says (the browsable API page would otherwise
render them as HTML).
"""

from __future__ import annotations

from typing import Any

from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from vms.errors import answer_for


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    response = _handle(exc, context)
    request = context.get("request")
    if response is not None and request is not None:
        # JSON whatever Accept asked for: DRF renders with the request's negotiated renderer.
        request.accepted_renderer = JSONRenderer()
        request.accepted_media_type = "application/json"
    return response


def _handle(exc: Exception, context: dict[str, Any]) -> Response | None:
    # The domain's errors first (vms.errors, shared with the dashboard's JSON views); DRF's own
    # (authentication, throttling, its 403 and 404) after.
    answer = answer_for(exc, permission=False)
    if answer is not None:
        return Response(answer.body, status=answer.status)
    return drf_exception_handler(exc, context)
