"""The task log: its dashboard page (``/tasks/``) and its API (``/api/v1/tasks/``).

Both show ``vms.tasklog``'s rows to whoever sees their VMs, newest first, with keyset
pagination; the page then follows ``ws/tasks/live/`` (``vms.consumers.TaskLogConsumer``).
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.caller import Caller
from accounts.scopes import VM_READ
from audit.commands import read_details, record_trail_read
from vms import tasklog

SECTION = "tasks"


def record_read(who: Any, what: str, filters: tasklog.Filters, tasks: list[dict[str, Any]]) -> None:
    """Showing others' requests is reading the trail: one ``audit.trail_read`` naming the request
    events shown. One's own requests are part of making them (as a request's status is)."""
    user_id = str(getattr(getattr(who, "user", None), "pk", ""))
    if all(t["actor_type"] == "user" and t.get("actor_id") == user_id for t in tasks):
        return
    record_trail_read(who, what, read_details(filters.as_dict(), tasks))


@require_GET
@login_required
def task_list(request: HttpRequest) -> HttpResponse:
    caller = Caller.from_request(request)
    errors: dict[str, list[str]] = {}
    try:
        filters = tasklog.Filters.parse(request.GET)
    except ValidationError as exc:
        errors, filters = exc.message_dict, tasklog.Filters()
    tasks, before = tasklog.page(caller, filters)
    record_read(request, "dashboard.tasks", filters, tasks)
    return render(
        request,
        "vms/tasks.html",
        {
            "tasks": tasks,
            "next_before": before,
            "filters": filters,
            "filter_errors": errors,
            "verbs": tasklog.VERBS,
            "states": tasklog.STATES,
            "live": filters.before is None,  # only the first page takes new rows
            # What the page's script matches pushed tasks against (None: not live).
            "live_filters": filters.as_dict() if filters.before is None else None,
            "section": SECTION,
        },
    )


class TaskSerializer(serializers.Serializer):
    id = serializers.CharField()
    position = serializers.IntegerField()
    version = serializers.IntegerField()
    vm = serializers.DictField()
    verb = serializers.ChoiceField(tasklog.VERBS)
    kind = serializers.ChoiceField(["request", "guest"])
    actor = serializers.CharField()
    actor_type = serializers.CharField()
    channel = serializers.CharField()
    state = serializers.ChoiceField(tasklog.STATES)
    step = serializers.CharField()
    pct = serializers.IntegerField(allow_null=True)
    message = serializers.CharField()
    outcome = serializers.CharField(allow_null=True)
    error = serializers.CharField()
    requested_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)
    duration_s = serializers.FloatField(allow_null=True)
    status_url = serializers.CharField()


class TaskPageSerializer(serializers.Serializer):
    results = TaskSerializer(many=True)
    next_before = serializers.IntegerField(allow_null=True)


class TaskListView(APIView):
    """Requests on the VMs the caller sees, newest first: ``?vm=&user=&verb=&state=&before=``;
    ``next_before`` pages on (keyset: as fast deep in the log as at its head)."""

    token_scopes = {"get": VM_READ}

    @extend_schema(
        parameters=[
            OpenApiParameter("vm", str, description="a VM's id"),
            OpenApiParameter("user", str, description="who asked (username)"),
            OpenApiParameter("verb", str, enum=list(tasklog.VERBS)),
            OpenApiParameter("state", str, enum=list(tasklog.STATES)),
            OpenApiParameter("before", int, description="the previous page's next_before"),
            OpenApiParameter("limit", int, description=f"1 to 200 (default {tasklog.PAGE_SIZE})"),
        ],
        responses=TaskPageSerializer,
    )
    def get(self, request: Request) -> Response:
        try:
            filters = tasklog.Filters.parse(request.query_params)
        except ValidationError as exc:
            raise serializers.ValidationError(exc.message_dict) from exc
        raw = request.query_params.get("limit", "")
        try:
            limit = int(raw) if raw else tasklog.PAGE_SIZE
            if not 1 <= limit <= 200:
                raise ValueError
        except ValueError:
            raise serializers.ValidationError({"limit": ["an integer from 1 to 200"]}) from None
        tasks, before = tasklog.page(Caller.from_request(request), filters, size=limit)
        record_read(request, "api.tasks", filters, tasks)
        return Response({"results": tasks, "next_before": before})
