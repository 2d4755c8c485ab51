"""Dashboard route of the task log, mounted by the project under ``/tasks/``.

path("tasks/", include("vms.urls_tasks")),   # in sandbox_site.urls urlpatterns
"""

from __future__ import annotations

from django.urls import path

from vms import task_views

app_name = "tasks"

urlpatterns = [
    path("", task_views.task_list, name="list"),
]
