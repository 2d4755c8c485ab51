"""Usage history over the REST API (``vms.usage``).

- ``GET /api/v1/vms/{id}/usage/``: one VM; whoever sees the VM (``vms.policy``).
- ``GET /api/v1/users/{id}/usage/``: the sum of a user's VMs; the user itself and readers of
  all VMs (to anyone else the user is not there: 404).
- ``GET /api/v1/groups/{id}/usage/`` and ``GET /api/v1/hosts/{name}/usage/``: the sum of the
  VMs of a group's members, of a host; readers of all VMs only (403).

Query: ``from`` and ``to`` (ISO 8601 with a zone, or epoch seconds; default the last hour),
``step`` (``10s`` ... ``1d`` or seconds, one of ``vms.usage.STEPS``; default ``auto``: at most
500 points). A bad value is a 400 naming the field; nothing is read.
"""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, datetime
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db.models import Q, QuerySet
from django.utils.dateparse import parse_datetime
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.caller import Caller
from accounts.scopes import VM_READ
from vms import lifecycle, policy, rightsizing, usage
from vms.models import VirtualMachine

__all__ = [
    "GroupUsageView",
    "HostUsageView",
    "UserUsageView",
    "VMUsageView",
    "parse_query",
]

MAX_RANGE_S = 366 * usage.DAY
LATEST = datetime(9000, 1, 1, tzinfo=UTC).timestamp()  # far from datetime's year 9999 limit
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": usage.DAY}
_STEP = re.compile(r"^(\d{1,6})([smhd]?)$")
HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _step_name(seconds: int) -> str:
    for suffix, size in (("d", usage.DAY), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{suffix}"
    return f"{seconds}s"


STEP_NAMES = ", ".join(_step_name(s) for s in usage.STEPS)


def _parse_time(name: str, raw: str) -> float:
    raw = raw.strip()
    if re.fullmatch(r"\d{1,12}(\.\d+)?", raw):
        return float(raw)
    try:
        when = parse_datetime(raw)
    except ValueError:
        when = None
    if when is None:
        raise ValidationError({name: "an ISO 8601 time with a zone, or epoch seconds"})
    if when.tzinfo is None:
        raise ValidationError({name: "give the time zone (e.g. Z or +00:00)"})
    return when.timestamp()


def parse_query(params: Any, now: float) -> tuple[int, int, int]:
    """(from, to, step) in epoch seconds from the query, validated."""
    end = _parse_time("to", params["to"]) if params.get("to") else now
    start = _parse_time("from", params["from"]) if params.get("from") else end - 3600
    for name, value in (("from", start), ("to", end)):
        if not 0 <= value < LATEST:
            raise ValidationError({name: "between 1970 and 9000"})
    if start >= end:
        raise ValidationError({"from": "must be before to"})
    if end - start > MAX_RANGE_S:
        raise ValidationError({"from": f"a range of at most {MAX_RANGE_S // usage.DAY} days"})
    start_i, end_i = math.floor(start), math.ceil(end)
    raw = (params.get("step") or "auto").strip()
    if raw == "auto":
        step = usage.auto_step(start_i, end_i)
    else:
        m = _STEP.fullmatch(raw)
        step = int(m.group(1)) * _UNITS[m.group(2) or "s"] if m else -1
        if step not in usage.STEPS:
            raise ValidationError({"step": f"auto or one of {STEP_NAMES}"})
    points = math.ceil((end_i - start_i) / step)
    if points > usage.MAX_POINTS:
        raise ValidationError(
            {
                "step": f"{_step_name(step)} gives {points} points over this range, at most "
                f"{usage.MAX_POINTS}: ask a larger step"
            }
        )
    return start_i, end_i, step


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


METRIC_SCHEMA = inline_serializer(
    "UsageValue",
    {"avg": serializers.FloatField(), "max": serializers.FloatField()},
    allow_null=True,
)
USAGE_SCHEMA = inline_serializer(
    "Usage",
    {
        "subject": serializers.DictField(),
        "from": serializers.CharField(),
        "to": serializers.CharField(),
        "step": serializers.IntegerField(),
        "rollup": serializers.BooleanField(),
        "vms": serializers.IntegerField(),
        "units": serializers.DictField(child=serializers.CharField()),
        "segments": serializers.ListField(child=serializers.DictField()),
        "points": serializers.ListField(child=serializers.DictField()),
    },
)
PARAMETERS = [
    OpenApiParameter(
        "from", OpenApiTypes.STR, description="ISO 8601 with a zone, or epoch seconds"
    ),
    OpenApiParameter("to", OpenApiTypes.STR, description="ISO 8601 with a zone, or epoch seconds"),
    OpenApiParameter("step", OpenApiTypes.STR, description=f"auto (default) or {STEP_NAMES}"),
]


class _UsageView(APIView):
    token_scopes = {"get": VM_READ}
    kind = ""

    def vms(self, caller: Caller, key: Any) -> tuple[QuerySet[VirtualMachine], bool]:
        """The VMs whose usage is asked for and whether they are summed; raises 403 or 404."""
        raise NotImplementedError

    def answer(self, request: Request, key: Any) -> Response:
        caller = Caller.from_request(request)
        now = time.time()
        # Who may see it first: a caller who may not learns nothing from a 400 either.
        qs, rollup = self.vms(caller, key)
        start, end, step = parse_query(request.query_params, now)
        if rollup:
            # Only VMs that lived in the range: a destroyed VM's last change is when it went.
            started = datetime.fromtimestamp(start, UTC)
            qs = qs.filter(~Q(state=lifecycle.GONE) | Q(state_changed_at__gte=started))
        vm_ids = list(qs.values_list("pk", flat=True))
        body = usage.series(vm_ids, start, end, step, rollup=rollup, now=now)
        for seg in body["segments"]:
            seg["from"], seg["to"] = _iso(seg["from"]), _iso(seg["to"])
        for point in body["points"]:
            point["t"] = _iso(point["ts"])
        return Response(
            {
                "subject": {"kind": self.kind, "id": str(key)},
                "from": _iso(start),
                "to": _iso(end),
                "step": step,
                "rollup": rollup,
                "vms": len(vm_ids),
                "units": usage.METRICS,
                **body,
            }
        )


class VMUsageView(_UsageView):
    """A VM's usage history: CPU, memory, disk and network, averages and maxima per step."""

    kind = "vm"

    def vms(self, caller: Caller, key: Any) -> tuple[QuerySet[VirtualMachine], bool]:
        qs = policy.visible_vms(caller).filter(pk=key)
        if not qs.exists():
            raise NotFound("No VirtualMachine matches the given query.")
        return qs, False

    @extend_schema(parameters=PARAMETERS, responses=USAGE_SCHEMA)
    def get(self, request: Request, pk: Any) -> Response:
        return self.answer(request, pk)


class UserUsageView(_UsageView):
    """The summed usage history of a user's VMs."""

    kind = "user"

    def vms(self, caller: Caller, key: Any) -> tuple[QuerySet[VirtualMachine], bool]:
        qs = policy.usage_vms_of_user(caller, key)
        if qs is None or not get_user_model().objects.filter(pk=key).exists():
            raise NotFound("No user matches the given query.")
        return qs, True

    @extend_schema(parameters=PARAMETERS, responses=USAGE_SCHEMA)
    def get(self, request: Request, pk: int) -> Response:
        return self.answer(request, pk)


class GroupUsageView(_UsageView):
    """The summed usage history of the VMs of a group's members (readers of all VMs)."""

    kind = "group"

    def vms(self, caller: Caller, key: Any) -> tuple[QuerySet[VirtualMachine], bool]:
        qs = policy.usage_vms_of_group(caller, key)
        if qs is None:
            raise PermissionDenied("only readers of all VMs see a group's usage")
        if not Group.objects.filter(pk=key).exists():
            raise NotFound("No group matches the given query.")
        return qs, True

    @extend_schema(parameters=PARAMETERS, responses=USAGE_SCHEMA)
    def get(self, request: Request, pk: int) -> Response:
        return self.answer(request, pk)


class HostUsageView(_UsageView):
    """The summed usage history of the VMs placed on a host (readers of all VMs)."""

    kind = "host"

    def vms(self, caller: Caller, key: Any) -> tuple[QuerySet[VirtualMachine], bool]:
        if not policy.may_see_usage_rollups(caller):
            raise PermissionDenied("only readers of all VMs see a host's usage")
        if not HOST_NAME.fullmatch(key):
            raise NotFound("No host matches the given query.")
        qs = VirtualMachine.objects.filter(host=key)
        if not qs.exists():
            raise NotFound("No host matches the given query.")
        return qs, True

    @extend_schema(parameters=PARAMETERS, responses=USAGE_SCHEMA)
    def get(self, request: Request, name: str) -> Response:
        return self.answer(request, name)


class VMRightSizingView(APIView):
    """What a VM's usage history says about its shape (``vms.rightsizing``): recommendations
    with their reasons, applied by the owner with a resize."""

    token_scopes = {"get": VM_READ}

    @extend_schema(responses=inline_serializer("RightSizing", {
        "window_hours": serializers.IntegerField(),
        "hours_of_history": serializers.IntegerField(),
        "current": serializers.DictField(),
        "figures": serializers.DictField(),
        "recommendations": serializers.ListField(child=serializers.DictField()),
        "note": serializers.CharField(required=False),
    }))  # fmt: skip
    def get(self, request: Request, pk: Any) -> Response:
        vm = policy.visible_vms(Caller.from_request(request)).filter(pk=pk).first()
        if vm is None:
            raise NotFound("No VirtualMachine matches the given query.")
        return Response(rightsizing.recommend(vm))
