"""Dashboard routes of the auditor area, mounted by the project under ``/audit/``.

path("audit/", include("audit.urls_dashboard")),   # in sandbox_site.urls urlpatterns
"""

from __future__ import annotations

from django.urls import path

from audit import views

app_name = "audit"

urlpatterns = [
    path("", views.trail, name="trail"),
    path("events/<int:position>/", views.event_detail, name="event"),
    path("verify/", views.verify, name="verify"),
    path("digests/", views.digests, name="digests"),
    path("digests/sign/", views.sign_digest, name="sign-digest"),
    path("keys.json", views.keys_json, name="keys-json"),
    path("exports/", views.export_list, name="exports"),
    path("exports/<uuid:pk>/", views.export_detail, name="export"),
    path("exports/<uuid:pk>/status.json", views.export_status, name="export-status"),
    path("exports/<uuid:pk>/download/", views.export_download, name="export-download"),
    path("access/", views.access, name="access"),
    path("retention/", views.retention_status, name="retention"),
]
