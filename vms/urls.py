"""Dashboard routes of the VM domain, mounted by the project under ``/vms/``.

path("vms/", include("vms.urls")),   # in sandbox_site.urls urlpatterns
"""

from __future__ import annotations

from django.urls import path

from vms import host_views, pool_views, preview_views, quota_views, views

app_name = "vms"

urlpatterns = [
    path("", views.vm_list, name="list"),
    path("new/", views.vm_create, name="create"),
    path("bulk/", views.vm_bulk, name="bulk"),
    path("quotas/", quota_views.quota_admin, name="quotas"),
    path("pools/", pool_views.pool_list, name="pools"),
    path("pools/<slug:template>/target/", pool_views.pool_target, name="pool-target"),
    path("hosts/", host_views.host_list, name="hosts"),
    path("hosts/<str:name>/", host_views.host_detail, name="host"),
    path("<uuid:pk>/", views.vm_detail, name="detail"),
    path("<uuid:pk>/console/", views.vm_console, name="console"),
    path("<uuid:pk>/exec/", views.vm_exec, name="exec"),
    path("<uuid:pk>/sysrq/", views.vm_sysrq, name="sysrq"),
    path("<uuid:pk>/lifetime/", views.vm_lifetime, name="lifetime"),
    path("<uuid:pk>/fork/", views.vm_fork, name="fork"),
    path("<uuid:pk>/forks/<uuid:snapshot_pk>/", views.vm_fork_status, name="fork-status"),
    path("<uuid:pk>/idle/", views.vm_idle, name="idle"),
    path("<uuid:pk>/snapshots/", views.vm_snapshots, name="snapshots"),
    path("<uuid:pk>/preview/", preview_views.vm_preview, name="preview"),
    path("<uuid:pk>/preview/revoke/", preview_views.vm_preview_revoke, name="preview-revoke"),
    path("<uuid:pk>/preview/<int:port>/", preview_views.vm_preview_open, name="preview-open"),
    path(
        "<uuid:pk>/<str:verb>/",
        views.vm_action,
        name="action",
    ),
    path(
        "<uuid:pk>/snapshots/<uuid:snapshot_pk>/<str:verb>/",
        views.snapshot_action,
        name="snapshot-action",
    ),
]
