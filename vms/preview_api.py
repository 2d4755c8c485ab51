"""Shareable, expiring links to a port of a VM's guest.

- ``POST /api/v1/vms/{id}/previews/`` makes one: a preview URL (``vms.previews``) carrying a
  signed grant; whoever holds it reaches that port until it expires or is revoked, as long as
  its maker may still share the VM (``vm.preview_link_created``).
- ``GET`` lists the VM's links (never their signed values: those are the credentials).
- ``DELETE /api/v1/vms/{id}/previews/{link_id}/`` revokes one, ``DELETE`` on the list every
  one still open (``vm.preview_link_revoked``).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import HttpRequest
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.caller import Caller
from accounts.scopes import VM_READ, needs
from vms import commands, lifecycle, policy, previews
from vms.models import PreviewLink, VirtualMachine

__all__ = ["PreviewLinkDetailView", "PreviewLinkView", "link_url"]


def link_url(request: HttpRequest, grant: previews.Grant) -> str:
    """The URL that opens ``grant``'s preview, on the scheme and port this request came on."""
    host = request.get_host()
    host_port = host.rsplit(":", 1)[1] if ":" in host and not host.endswith("]") else ""
    origin = previews.preview_origin(
        grant.vm_id, grant.port, secure=request.is_secure(), host_port=host_port
    )
    return f"{origin}/?{previews.QUERY_PARAM}={previews.url_value(grant)}"


class PreviewLinkRequestSerializer(serializers.Serializer):
    port = serializers.IntegerField(min_value=1, max_value=65535)
    expires_in = serializers.IntegerField(
        min_value=1,
        required=False,
        help_text="Seconds the link works for (default SANDBOX_PREVIEW_LINK_DEFAULT_S, "
        "at most SANDBOX_PREVIEW_LINK_MAX_S).",
    )

    def validate_expires_in(self, value: int) -> int:
        if value > settings.SANDBOX_PREVIEW_LINK_MAX_S:
            raise ValidationError(f"at most {settings.SANDBOX_PREVIEW_LINK_MAX_S} seconds")
        return value

    def validate_port(self, value: int) -> int:
        if not previews.port_allowed(value):
            raise ValidationError("this port may not be previewed")
        return value


class PreviewLinkSerializer(serializers.Serializer):
    url = serializers.URLField()
    port = serializers.IntegerField()
    link_id = serializers.CharField()
    expires_at = serializers.DateTimeField()


class PreviewLinkRecordSerializer(serializers.ModelSerializer):
    open = serializers.SerializerMethodField()

    class Meta:
        model = PreviewLink
        fields = [
            "link_id",
            "port",
            "created_by",
            "created_at",
            "expires_at",
            "revoked_at",
            "revoked_by",
            "open",
        ]

    def get_open(self, link: PreviewLink) -> bool:
        return link.revoked_at is None and link.expires_at > datetime.now(tz=UTC)


class RevokedSerializer(serializers.Serializer):
    revoked = serializers.ListField(child=serializers.CharField())


def _visible_vm(caller: Caller, pk: uuid.UUID) -> VirtualMachine:
    vm = policy.visible_vms(caller).filter(pk=pk).exclude(state=lifecycle.GONE).first()
    if vm is None:
        raise NotFound("no such VM")
    return vm


def _revoke(caller: Caller, vm: VirtualMachine, link_id: str | None) -> Response:
    try:
        ids = commands.revoke_preview_links(caller, vm, link_id)
    except DjangoPermissionDenied as exc:
        raise PermissionDenied(str(exc)) from exc
    except DjangoValidationError as exc:
        raise ValidationError(exc.message_dict) from exc
    except commands.NotFound as exc:
        raise NotFound(str(exc)) from exc
    return Response(RevokedSerializer({"revoked": ids}).data)


class PreviewLinkView(APIView):
    """A VM's shareable links: make one to a port of its guest, list them, revoke all that are
    still open (its owner, or who may act on it; whoever sees the VM may list)."""

    token_scopes = {
        "get": VM_READ,
        "post": needs(lifecycle.verb("share_preview").permission),
        "delete": needs(lifecycle.verb("revoke_preview").permission),
    }

    @extend_schema(responses={200: PreviewLinkRecordSerializer(many=True)})
    def get(self, request: Request, pk: uuid.UUID) -> Response:
        vm = _visible_vm(Caller.from_request(request), pk)
        links = PreviewLink.objects.filter(vm_id=vm.pk)[:500]
        return Response(PreviewLinkRecordSerializer(links, many=True).data)

    @extend_schema(
        operation_id="vms_previews_revoke_all", request=None, responses={200: RevokedSerializer}
    )
    def delete(self, request: Request, pk: uuid.UUID) -> Response:
        caller = Caller.from_request(request)
        return _revoke(caller, _visible_vm(caller, pk), None)

    @extend_schema(request=PreviewLinkRequestSerializer, responses={201: PreviewLinkSerializer})
    def post(self, request: Request, pk: uuid.UUID) -> Response:
        if not settings.SANDBOX_PREVIEW_DOMAIN:
            raise NotFound("previews are turned off (SANDBOX_PREVIEW_DOMAIN is empty)")
        caller = Caller.from_request(request)
        vm = policy.visible_vms(caller).filter(pk=pk).exclude(state=lifecycle.GONE).first()
        if vm is None:
            raise NotFound("no such VM")
        body = PreviewLinkRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data: dict[str, Any] = body.validated_data
        seconds = data.get("expires_in") or settings.SANDBOX_PREVIEW_LINK_DEFAULT_S
        try:
            grant = commands.create_preview_link(caller, vm, data["port"], seconds)
        except DjangoPermissionDenied as exc:
            raise PermissionDenied(str(exc)) from exc
        except DjangoValidationError as exc:
            raise ValidationError(exc.message_dict) from exc
        except commands.NotFound as exc:
            raise NotFound(str(exc)) from exc
        payload = {
            "url": link_url(request, grant),
            "port": grant.port,
            "link_id": grant.link_id,
            "expires_at": datetime.fromtimestamp(grant.expires, tz=UTC),
        }
        return Response(PreviewLinkSerializer(payload).data, status=status.HTTP_201_CREATED)


class PreviewLinkDetailView(APIView):
    """Revoke one shareable link of this VM."""

    token_scopes = {"delete": needs(lifecycle.verb("revoke_preview").permission)}

    @extend_schema(
        operation_id="vms_previews_revoke", request=None, responses={200: RevokedSerializer}
    )
    def delete(self, request: Request, pk: uuid.UUID, link_id: str) -> Response:
        caller = Caller.from_request(request)
        return _revoke(caller, _visible_vm(caller, pk), link_id)
