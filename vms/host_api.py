"""``GET /api/v1/hosts/``: each hypervisor host's capacity, what is committed to it, what it
really uses and its overcommit ratios (``vms.capacity``), with the overcommit settings. Readers
of all VMs only (``vms.policy``): it sums other users' VMs; anyone else gets a 403."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework.exceptions import PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.caller import Caller
from accounts.scopes import VM_READ
from vms import capacity, policy

__all__ = ["HostCapacityView"]


class HostCapacityView(APIView):
    """The hosts' capacity, commitments and use (readers of all VMs)."""

    token_scopes = {"get": VM_READ}

    @extend_schema(responses={200: OpenApiTypes.OBJECT})
    def get(self, request: Request) -> Response:
        if not policy.may_see_usage_rollups(Caller.from_request(request)):
            raise PermissionDenied("only readers of all VMs see the hosts")
        return Response(capacity.report())
