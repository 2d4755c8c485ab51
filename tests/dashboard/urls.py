"""The project's URLs plus the dashboard's VM pages, until the lead mounts them in
sandbox_site.urls. Once ``sandbox_site.urls`` includes ``vms.urls`` this adds nothing, so the
tests run the same either way."""

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
if not _mounted("/vms/"):
    urlpatterns.append(path("vms/", include("vms.urls")))
