"""Django's error views, answering in the API's error shape under /api/.

DRF turns the errors it knows into ``{"detail": ...}``; what it does not see (a path that no
route matches, an exception no handler maps, a request Django refuses before any view) would
get Django's HTML page. Under /api/ these answer JSON of the same shape; elsewhere Django's own
pages stay.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults


def is_api(request: HttpRequest) -> bool:
    return request.path.startswith("/api/")


def _json(request: HttpRequest, status: int, detail: str) -> JsonResponse:
    response = JsonResponse({"detail": detail}, status=status)
    request_id = getattr(request, "request_id", None)
    if request_id:
        response["X-Request-ID"] = request_id
    return response


def bad_request(request: HttpRequest, exception: Exception, **kwargs: Any) -> HttpResponse:
    if is_api(request):
        return _json(request, 400, "Bad request.")
    return defaults.bad_request(request, exception, **kwargs)


def permission_denied(request: HttpRequest, exception: Exception, **kwargs: Any) -> HttpResponse:
    if is_api(request):
        return _json(request, 403, "You do not have permission to perform this action.")
    return defaults.permission_denied(request, exception, **kwargs)


def page_not_found(request: HttpRequest, exception: Exception, **kwargs: Any) -> HttpResponse:
    if is_api(request):
        return _json(request, 404, "Not found.")
    return defaults.page_not_found(request, exception, **kwargs)


def server_error(request: HttpRequest, **kwargs: Any) -> HttpResponse:
    if is_api(request):
        # Nothing about the failure itself: the log has it, under the request id returned.
        return _json(request, 500, "Server error; the request id identifies it in the log.")
    return defaults.server_error(request, **kwargs)
