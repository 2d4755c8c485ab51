"""The project's URLs plus the auditor routes, until the lead mounts them in sandbox_site.urls.

Once ``sandbox_site.urls`` includes ``audit.urls`` and ``audit.urls_dashboard`` this adds
nothing, so the tests run the same either way.
"""

from __future__ import annotations

from django.urls import Resolver404, include, path, resolve

from sandbox_site.urls import urlpatterns as project_urlpatterns


def _mounted(url: str) -> bool:
    try:
        resolve(url, urlconf="sandbox_site.urls")
    except Resolver404:
        return False
    return True


urlpatterns = list(project_urlpatterns)
if not _mounted("/api/v1/audit/keys/"):
    urlpatterns.append(path("api/v1/audit/", include("audit.urls")))
if not _mounted("/audit/"):
    urlpatterns.append(path("audit/", include("audit.urls_dashboard")))
