"""REST API of sandbox networking: networks (admins define them, everyone reads them), a VM's
port forwards (``/vms/{id}/ports/``) and its egress policy (``/vms/{id}/egress/``).

Views parse the input and call ``vms.commands``; who may do what is ``vms.policy``'s (the
lifecycle table's verbs for a VM's forwards and egress, the network permissions for networks).
"""

from __future__ import annotations

import uuid
from typing import Any

from django.http import Http404
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.caller import Caller
from accounts.scopes import OPEN, VM_READ, needs
from vms import commands, lifecycle, policy
from vms.api import scopes_of
from vms.models import EGRESS_CHOICES, Network, PortForward, VirtualMachine

__all__ = ["EgressView", "NetworkViewSet", "PortForwardViewSet"]


# --- Networks -----------------------------------------------------------------------------------


class NetworkSerializer(serializers.ModelSerializer):
    class Meta:
        model = Network
        fields = [
            "id",
            "name",
            "subnet",
            "gateway",
            "bridge",
            "isolated",
            "port_min",
            "port_max",
            "default_egress",
            "is_default",
            "created_at",
        ]
        read_only_fields = fields


class NetworkInputSerializer(serializers.Serializer):
    """The fields an admin gives; the command checks them further (overlaps, names in use)."""

    name = serializers.SlugField(max_length=63)
    subnet = serializers.CharField(max_length=18)
    bridge = serializers.CharField(max_length=15)
    isolated = serializers.BooleanField(default=True)
    port_min = serializers.IntegerField(min_value=1024, max_value=65535)
    port_max = serializers.IntegerField(min_value=1024, max_value=65535)
    default_egress = serializers.ChoiceField(EGRESS_CHOICES, default="none")
    is_default = serializers.BooleanField(default=False)


def _network_scope(action: str) -> Any:
    return needs(policy.NETWORK_PERMISSIONS[action])


class NetworkViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """The networks VMs join. Administrators define, change and delete them (never the default
    one, nor one with VMs on it); everyone reads them."""

    queryset = Network.objects.all()
    serializer_class = NetworkSerializer
    token_scopes = {
        "list": OPEN,
        "retrieve": OPEN,
        "create": _network_scope("add"),
        "update": _network_scope("change"),
        "partial_update": _network_scope("change"),
        "destroy": _network_scope("delete"),
    }

    def caller(self) -> Caller:
        return Caller.from_request(self.request)

    @extend_schema(request=NetworkInputSerializer, responses={201: NetworkSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        policy.require_network_admin(self.caller(), "add")
        s = NetworkInputSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        network = commands.create_network(self.caller(), **s.validated_data)
        return Response(NetworkSerializer(network).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=NetworkInputSerializer, responses=NetworkSerializer)
    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        network = self.get_object()
        policy.require_network_admin(self.caller(), "change")
        s = NetworkInputSerializer(data=request.data, partial=kwargs.get("partial", False))
        s.is_valid(raise_exception=True)
        fields = dict(s.validated_data)
        if kwargs.get("partial"):
            fields = {k: v for k, v in fields.items() if k in request.data}
        network = commands.update_network(self.caller(), network, **fields)
        return Response(NetworkSerializer(network).data)

    @extend_schema(request=NetworkInputSerializer, responses=NetworkSerializer)
    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return self.update(request, *args, partial=True, **kwargs)

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        network = self.get_object()
        policy.require_network_admin(self.caller(), "delete")
        commands.delete_network(self.caller(), network)
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- A VM's port forwards and egress -------------------------------------------------------------


def _id_or_404(value: Any, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise Http404(f"No {what} matches the given query.") from None


def _vm_of(request: Request, vm_pk: Any) -> VirtualMachine:
    """The VM the path names, if the caller may see it (else 404, as for a missing one)."""
    found = (
        policy.visible_vms(Caller.from_request(request))
        .filter(pk=_id_or_404(vm_pk, "VirtualMachine"))
        .first()
    )
    if found is None:
        raise Http404("No VirtualMachine matches the given query.")
    return found


class PortForwardSerializer(serializers.ModelSerializer):
    class Meta:
        model = PortForward
        fields = ["id", "protocol", "guest_port", "host_port", "created_at"]
        read_only_fields = fields


class PortForwardInputSerializer(serializers.Serializer):
    protocol = serializers.ChoiceField(PortForward.PROTOCOLS, default="tcp")
    guest_port = serializers.IntegerField(min_value=1, max_value=65535)
    host_port = serializers.IntegerField(
        min_value=1, max_value=65535, required=False, help_text="default: the lowest free one"
    )


class PortForwardViewSet(
    mixins.ListModelMixin,
    mixins.CreateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """A VM's port forwards: a host port (from its network's range) to a port of its guest.
    Its owner (or a manager of all VMs) adds and removes them."""

    queryset = PortForward.objects.none()  # for the schema; get_queryset says whose
    serializer_class = PortForwardSerializer
    pagination_class = None
    token_scopes = {"list": VM_READ, **scopes_of("ports")}

    def vm(self) -> VirtualMachine:
        return _vm_of(self.request, self.kwargs["vm_pk"])

    def get_queryset(self) -> Any:
        return PortForward.objects.filter(vm=self.vm())

    @extend_schema(request=PortForwardInputSerializer, responses={201: PortForwardSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        vm = self.vm()
        caller = Caller.from_request(request)
        policy.require(caller, "add_port_forward", vm.owner_id)
        s = PortForwardInputSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        forward = commands.add_port_forward(caller, vm, **s.validated_data)
        return Response(PortForwardSerializer(forward).data, status=status.HTTP_201_CREATED)

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        vm = self.vm()
        caller = Caller.from_request(request)
        policy.require(caller, "remove_port_forward", vm.owner_id)
        forward = PortForward.objects.filter(
            vm=vm, pk=_id_or_404(kwargs["pk"], "port forward")
        ).first()
        if forward is None:
            raise Http404("No port forward matches the given query.")
        commands.remove_port_forward(caller, vm, forward)
        return Response(status=status.HTTP_204_NO_CONTENT)


class EgressSerializer(serializers.Serializer):
    egress = serializers.ChoiceField(EGRESS_CHOICES)
    allow = serializers.ListField(
        child=serializers.CharField(max_length=253),
        required=False,
        default=list,
        help_text="IPv4 networks (CIDR) and domain names; with egress allow-list only",
    )


class EgressView(APIView):
    """What a VM may reach outside its network: none, an allow list, or the internet."""

    token_scopes = {
        "get": VM_READ,
        "put": needs(lifecycle.verb("set_egress").permission),
    }

    @extend_schema(responses=EgressSerializer)
    def get(self, request: Request, vm_pk: Any) -> Response:
        vm = _vm_of(request, vm_pk)
        return Response({"egress": vm.egress, "allow": list(vm.egress_allow)})

    @extend_schema(
        request=EgressSerializer,
        responses=inline_serializer(
            "EgressChanged",
            {
                "egress": serializers.ChoiceField(EGRESS_CHOICES),
                "allow": serializers.ListField(child=serializers.CharField()),
            },
        ),
    )
    def put(self, request: Request, vm_pk: Any) -> Response:
        vm = _vm_of(request, vm_pk)
        caller = Caller.from_request(request)
        policy.require(caller, "set_egress", vm.owner_id)
        s = EgressSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        event = commands.set_egress(
            caller, vm, egress=s.validated_data["egress"], allow=s.validated_data["allow"]
        )
        return Response({"egress": event.data["egress"], "allow": event.data["allow"]})
