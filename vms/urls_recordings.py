"""Console session routes, mounted by the project under ``/audit/sessions/``: the list, the replay
and the recording (the VM domain records the sessions; the auditor area links the list from its
navigation through the section ``vms.recordings.SECTION`` registers).

path("audit/sessions/", include("vms.urls_recordings")),   # in sandbox_site.urls urlpatterns
"""

from __future__ import annotations

from django.urls import path

from vms import recordings

app_name = "recordings"

urlpatterns = [
    path("", recordings.sessions, name="sessions"),
    path("<int:position>/replay/", recordings.replay, name="replay"),
    path("<int:position>/cast", recordings.cast, name="cast"),
]
