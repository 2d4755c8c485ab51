"""Django's error views, answering in the API's error shape under /api/.

DRF turns the errors it knows into ``{"detail": ...}``; what it does not see (a path that no
route matches, an exception no handler maps, a request Django refuses before any view) would
get Django's HTML page. Under /api/ these answer JSON of the same shape; elsewhere the
dashboard's pages answer (templates/400.html, 403.html, 404.html, 500.html and 403_csrf.html: the
layout, with the menu when the user is known). Django's views render the first three with the
request's context; the 500 page is rendered without it (no user, no database query: the database
may be what failed), with the request id that finds the failure in the log.
"""

from __future__ import annotations

import logging
from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseServerError, JsonResponse
from django.template import loader
from django.utils.html import escape
from django.views import defaults

logger = logging.getLogger(__name__)


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
    request_id = getattr(request, "request_id", "")
    try:
        page = loader.get_template("500.html").render({"request_id": request_id})
    except Exception:  # the page of last resort must not fail: plain text then
        logger.exception("the 500 page failed to render")
        page = (
            "<!doctype html><title>Server error</title><h1>Server error</h1>"
            f"<p>Request id {escape(request_id)}</p>"
        )
    return HttpResponseServerError(page)
