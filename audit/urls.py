"""API routes for auditors, mounted by the project under ``/api/v1/audit/``.

path("audit/", include("audit.urls")),   # in sandbox_site.urls api_v1
"""

from __future__ import annotations

from django.urls import include, path
from rest_framework.routers import SimpleRouter

from audit import export_api

app_name = "audit-api"

router = SimpleRouter()
router.register("exports", export_api.ExportJobViewSet, basename="export")
router.register("digests", export_api.DigestViewSet, basename="digest")

urlpatterns = [
    path("", include(router.urls)),
    path("frameworks/", export_api.FrameworkView.as_view(), name="frameworks"),
    path("reports/", export_api.ReportView.as_view(), name="reports"),
    path("bundles/", export_api.BundleView.as_view(), name="bundles"),
    path("archives/", export_api.ArchiveView.as_view(), name="archives"),
    path("keys/", export_api.KeyView.as_view(), name="keys"),
    path("access/", export_api.AccessView.as_view(), name="access"),
    path("retention/", export_api.RetentionView.as_view(), name="retention"),
    path("breaks/", export_api.BreakView.as_view(), name="breaks"),
    path("legal-holds/", export_api.LegalHoldView.as_view(), name="legal-holds"),
    path(
        "legal-holds/<str:hold_id>/release/",
        export_api.LegalHoldReleaseView.as_view(),
        name="legal-hold-release",
    ),
]
