"""``/api/v1/pools/``: the warm pools (``vms.pools``), administrators only.

``GET /api/v1/pools/``: per template its target, ready and warming members and their memory, with
the system's pool budget. ``PUT`` or ``PATCH /api/v1/pools/{template}/`` with ``{"target": N}``
sets a template's target (``pool.target_set``; a lower one evicts the members over it)."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.caller import Caller
from core.scopes import needs
from vms import commands, policy, pools

__all__ = ["PoolTargetView", "PoolsView"]

POOL_VIEW = needs(policy.POOL_PERMISSIONS["view"])
POOL_CHANGE = needs(policy.POOL_PERMISSIONS["change"])


class PoolTargetSerializer(serializers.Serializer):
    target = serializers.IntegerField(min_value=0, max_value=commands.POOL_TARGET_MAX)


class PoolsView(APIView):
    """Every template's warm pool and the pool budget (administrators)."""

    token_scopes = {"get": POOL_VIEW}

    @extend_schema(responses={200: OpenApiTypes.OBJECT})
    def get(self, request: Request) -> Response:
        policy.require_pool_admin(Caller.from_request(request), "view")
        return Response(pools.report())


class PoolTargetView(APIView):
    """Set one template's warm pool target (administrators)."""

    token_scopes = {"put": POOL_CHANGE, "patch": POOL_CHANGE}

    @extend_schema(
        request=PoolTargetSerializer,
        responses=inline_serializer(
            "PoolTargetSet",
            {
                "template": serializers.CharField(),
                "target": serializers.IntegerField(),
                "before": serializers.IntegerField(),
                "event_id": serializers.CharField(),
            },
        ),
    )
    def put(self, request: Request, template: str) -> Response:
        caller = Caller.from_request(request)
        policy.require_pool_admin(caller)
        s = PoolTargetSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        event = commands.set_pool_target(caller, template, s.validated_data["target"])
        return Response({**event.data, "event_id": event.event_id})

    @extend_schema(
        request=PoolTargetSerializer,
        responses=inline_serializer(
            "PoolTargetPatched",
            {
                "template": serializers.CharField(),
                "target": serializers.IntegerField(),
                "before": serializers.IntegerField(),
                "event_id": serializers.CharField(),
            },
        ),
    )
    def patch(self, request: Request, template: str) -> Response:
        return self.put(request, template)
