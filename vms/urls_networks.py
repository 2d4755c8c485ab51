"""Dashboard routes of networks, mounted by the project under ``/networks/``.

path("networks/", include("vms.urls_networks")),   # in sandbox_site.urls urlpatterns
"""

from __future__ import annotations

from django.urls import path

from vms import network_views

app_name = "networks"

urlpatterns = [
    path("", network_views.network_list, name="list"),
    path("<uuid:pk>/edit/", network_views.network_edit, name="edit"),
    path("<uuid:pk>/delete/", network_views.network_delete, name="delete"),
]
