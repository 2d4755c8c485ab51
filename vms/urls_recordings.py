"""Console recording routes, mounted by the project under ``/audit/sessions/`` (the auditor area
lists the sessions; the VM domain, which records them, plays them back).

path("audit/sessions/", include("vms.urls_recordings")),   # in sandbox_site.urls urlpatterns
"""

from __future__ import annotations

from django.urls import path

from vms import recordings

app_name = "recordings"

urlpatterns = [
    path("<int:position>/replay/", recordings.replay, name="replay"),
    path("<int:position>/cast", recordings.cast, name="cast"),
]
