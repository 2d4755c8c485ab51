"""The worker's queue, schedules and task results in the Django admin: for reading only.

django-q2 registers them editable: adding or changing a schedule there (its function is any
dotted path) or resubmitting a task would hand the worker a task that no command asked for and
no event records. Schedules are the product's own (``core.schedules``), written after
``migrate``; the worker refuses anything else (``vms.task_guard``).
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django_q import admin as django_q_admin  # noqa: F401 - registers django-q2's admin first
from django_q.models import Failure, OrmQ, Schedule, Success


def _read_only(model_admin: type[admin.ModelAdmin]) -> type[admin.ModelAdmin]:
    class ReadOnly(model_admin):  # type: ignore[valid-type,misc]
        actions: list[Any] = []

        def has_add_permission(self, request: Any, obj: Any = None) -> bool:
            return False

        def has_change_permission(self, request: Any, obj: Any = None) -> bool:
            return False

        def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
            return False

    ReadOnly.__name__ = ReadOnly.__qualname__ = f"ReadOnly{model_admin.__name__}"
    return ReadOnly


for _model in (Schedule, Success, Failure, OrmQ):
    if admin.site.is_registered(_model):
        _admin_class = type(admin.site.get_model_admin(_model))
        admin.site.unregister(_model)
        admin.site.register(_model, _read_only(_admin_class))
