"""``/api/v1/webhooks/``: subscriptions (list, read, create, change, delete), their deliveries
with every attempt, a test ping, a new secret, disable and enable.

The signing secret is in the answer to a create and to a rotation only, never again. Who may do
what: ``webhooks.policy`` (another user's subscription the caller may not see is a 404); every
operation states its token scope. docs/webhooks.md describes the deliveries.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import (
    OpenApiParameter,
    extend_schema,
    extend_schema_field,
    inline_serializer,
)
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from accounts.caller import Caller
from core.scopes import needs
from webhooks import commands, policy
from webhooks.models import Delivery, DeliveryAttempt, Subscription

__all__ = ["WebhookViewSet"]


class FiltersSerializer(serializers.Serializer):
    vm_ids = serializers.ListField(
        child=serializers.CharField(max_length=64),
        required=False,
        help_text="only events of these VMs (and their snapshots)",
    )
    owners = serializers.ListField(
        child=serializers.CharField(max_length=150),
        required=False,
        help_text="only events of these users' VMs (usernames)",
    )


class SubscriptionSerializer(serializers.ModelSerializer):
    """A subscription; its full URL (whose path may carry a receiver's token) only to whom may
    act on it, others see its origin (``target``)."""

    owner = serializers.CharField(source="owner.username", read_only=True)
    url = serializers.SerializerMethodField()
    target = serializers.CharField(read_only=True, help_text="scheme://host:port of the URL")
    filters = serializers.SerializerMethodField()
    previous_secret_valid_until = serializers.DateTimeField(
        source="previous_until", read_only=True, allow_null=True
    )

    class Meta:
        model = Subscription
        fields = [
            "id",
            "owner",
            "url",
            "target",
            "description",
            "event_types",
            "filters",
            "active",
            "allow_private",
            "secret_version",
            "previous_secret_valid_until",
            "consecutive_failures",
            "disabled_reason",
            "disabled_at",
            "last_success_at",
            "last_failure_at",
            "last_error",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields

    def get_url(self, obj: Subscription) -> str | None:
        caller = self.context.get("caller")
        return obj.url if caller is not None and policy.may_act_on(caller, obj) else None

    @extend_schema_field(FiltersSerializer)  # type: ignore[misc]
    def get_filters(self, obj: Subscription) -> dict[str, list[str]]:
        return {"vm_ids": list(obj.vm_ids), "owners": list(obj.owners)}


class IssuedSerializer(SubscriptionSerializer):
    secret = serializers.CharField(
        read_only=True, help_text="the signing secret: shown in this answer only"
    )

    class Meta(SubscriptionSerializer.Meta):
        fields = [*SubscriptionSerializer.Meta.fields, "secret"]
        read_only_fields = fields


def _issued(issued: commands.Issued, caller: Caller) -> dict[str, Any]:
    data = dict(SubscriptionSerializer(issued.subscription, context={"caller": caller}).data)
    data["secret"] = issued.secret
    return data


class SubscriptionWriteSerializer(serializers.Serializer):
    url = serializers.CharField(max_length=2048, help_text="http(s) URL that receives the POSTs")
    event_types = serializers.ListField(
        child=serializers.CharField(max_length=64),
        help_text="event types or globs: vm.*, snapshot.created, *",
    )
    filters = FiltersSerializer(required=False)
    description = serializers.CharField(max_length=200, required=False, allow_blank=True)
    allow_private = serializers.BooleanField(
        required=False,
        help_text="deliver to loopback or private addresses (webhooks.allow_private_targets)",
    )


class SubscriptionPatchSerializer(SubscriptionWriteSerializer):
    url = serializers.CharField(max_length=2048, required=False)
    event_types = serializers.ListField(child=serializers.CharField(max_length=64), required=False)


class AttemptSerializer(serializers.ModelSerializer):
    class Meta:
        model = DeliveryAttempt
        fields = [
            "number",
            "started_at",
            "duration_ms",
            "address",
            "status_code",
            "error",
            "response_excerpt",
            "next_retry_at",
        ]
        read_only_fields = fields


class DeliverySerializer(serializers.ModelSerializer):
    attempt_log = AttemptSerializer(source="tries", many=True, read_only=True)

    class Meta:
        model = Delivery
        fields = [
            "id",
            "event_id",
            "event_position",
            "event_type",
            "status",
            "attempts",
            "next_attempt_at",
            "created_at",
            "finished_at",
            "last_status_code",
            "last_error",
            "attempt_log",
        ]
        read_only_fields = fields


WRITE = needs(policy.CHANGE)


class WebhookViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    viewsets.GenericViewSet,
):
    """Webhook subscriptions you own (every user's with webhooks.view_subscription)."""

    serializer_class = SubscriptionSerializer
    queryset = Subscription.objects.none()  # for the schema; get_queryset says whose
    filterset_fields = ["active"]
    token_scopes = {
        "list": policy.SUBSCRIPTION_READ,
        "retrieve": policy.SUBSCRIPTION_READ,
        "deliveries": policy.SUBSCRIPTION_READ,
        "create": needs(policy.SUBSCRIBE),
        "update": WRITE,
        "partial_update": WRITE,
        "destroy": needs(policy.DELETE),
        "ping": WRITE,
        "rotate_secret": WRITE,
        "enable": WRITE,
        "disable": WRITE,
    }

    def caller(self) -> Caller:
        return Caller.from_request(self.request)

    def get_queryset(self) -> Any:
        return policy.visible_subscriptions(self.caller())

    def get_object(self) -> Subscription:
        try:
            return super().get_object()  # type: ignore[no-any-return]
        except DjangoValidationError as exc:  # a malformed id: no such subscription either
            raise NotFound("no such webhook subscription") from exc

    def get_serializer_context(self) -> dict[str, Any]:
        return {**super().get_serializer_context(), "caller": self.caller()}

    @extend_schema(request=SubscriptionWriteSerializer, responses={201: IssuedSerializer})
    def create(self, request: Request) -> Response:
        s = SubscriptionWriteSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        data = s.validated_data
        filters = data.get("filters") or {}
        issued = commands.subscribe(
            self.caller(),
            url=data["url"],
            event_types=data["event_types"],
            vm_ids=filters.get("vm_ids"),
            owners=filters.get("owners"),
            description=data.get("description", ""),
            allow_private=data.get("allow_private", False),
        )
        return Response(_issued(issued, self.caller()), status=status.HTTP_201_CREATED)

    def _change(self, request: Request, partial: bool) -> Response:
        sub = self.get_object()
        s = (SubscriptionPatchSerializer if partial else SubscriptionWriteSerializer)(
            data=request.data
        )
        s.is_valid(raise_exception=True)
        data = s.validated_data
        filters = data.get("filters")
        if not partial:
            filters = filters or {}
        try:
            sub = commands.update(
                self.caller(),
                sub,
                url=data.get("url"),
                event_types=data.get("event_types"),
                vm_ids=None if filters is None else filters.get("vm_ids", []),
                owners=None if filters is None else filters.get("owners", []),
                description=data.get("description", None if partial else ""),
                allow_private=data.get("allow_private"),
            )
        except Subscription.DoesNotExist as exc:
            raise NotFound("no such webhook subscription") from exc
        return Response(self.get_serializer(sub).data)

    @extend_schema(request=SubscriptionWriteSerializer, responses={200: SubscriptionSerializer})
    def update(self, request: Request, pk: Any = None) -> Response:
        return self._change(request, partial=False)

    @extend_schema(request=SubscriptionPatchSerializer, responses={200: SubscriptionSerializer})
    def partial_update(self, request: Request, pk: Any = None) -> Response:
        return self._change(request, partial=True)

    @extend_schema(responses={204: None})
    def destroy(self, request: Request, pk: Any = None) -> Response:
        try:
            commands.delete(self.caller(), self.get_object())
        except Subscription.DoesNotExist as exc:
            raise NotFound("no such webhook subscription") from exc
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        responses=DeliverySerializer(many=True),
        parameters=[
            OpenApiParameter("status", str, enum=list(Delivery.Status.values), required=False)
        ],
    )
    @action(detail=True, methods=["get"], filter_backends=[])
    def deliveries(self, request: Request, pk: Any = None) -> Response:
        """The subscription's deliveries, newest event first, each with its attempts.
        ``?status=pending|delivered|failed|skipped|cancelled`` narrows them."""
        sub = self.get_object()
        qs = Delivery.objects.filter(subscription=sub).prefetch_related("tries")
        wanted = request.query_params.get("status")
        if wanted:
            if wanted not in Delivery.Status.values:
                raise serializers.ValidationError(
                    {"status": f"one of {', '.join(Delivery.Status.values)}"}
                )
            qs = qs.filter(status=wanted)
        page = self.paginate_queryset(qs.order_by("-event_position"))
        return self.get_paginated_response(DeliverySerializer(page, many=True).data)

    @extend_schema(
        request=None,
        responses={
            202: inline_serializer(
                "WebhookPing",
                {"event_id": serializers.UUIDField(), "position": serializers.IntegerField()},
            )
        },
    )
    @action(detail=True, methods=["post"])
    def ping(self, request: Request, pk: Any = None) -> Response:
        """Record ``webhook.pinged``: the workers deliver it to this subscription (see its
        deliveries for the outcome)."""
        try:
            event = commands.ping(self.caller(), self.get_object())
        except Subscription.DoesNotExist as exc:
            raise NotFound("no such webhook subscription") from exc
        return Response(
            {"event_id": event.event_id, "position": event.position},
            status=status.HTTP_202_ACCEPTED,
        )

    @extend_schema(request=None, responses={200: IssuedSerializer})
    @action(detail=True, methods=["post"], url_path="rotate-secret")
    def rotate_secret(self, request: Request, pk: Any = None) -> Response:
        """A new signing secret (in this answer only); the previous one keeps signing beside
        it until ``previous_secret_valid_until``."""
        try:
            issued = commands.rotate_secret(self.caller(), self.get_object())
        except Subscription.DoesNotExist as exc:
            raise NotFound("no such webhook subscription") from exc
        return Response(_issued(issued, self.caller()))

    @extend_schema(request=None, responses={200: SubscriptionSerializer})
    @action(detail=True, methods=["post"])
    def enable(self, request: Request, pk: Any = None) -> Response:
        """Deliver again (events from now on); the target is checked again first."""
        try:
            sub = commands.enable(self.caller(), self.get_object())
        except Subscription.DoesNotExist as exc:
            raise NotFound("no such webhook subscription") from exc
        return Response(self.get_serializer(sub).data)

    @extend_schema(request=None, responses={200: SubscriptionSerializer})
    @action(detail=True, methods=["post"])
    def disable(self, request: Request, pk: Any = None) -> Response:
        """Stop delivering; pending deliveries are cancelled."""
        try:
            sub = commands.disable(self.caller(), self.get_object())
        except Subscription.DoesNotExist as exc:
            raise NotFound("no such webhook subscription") from exc
        return Response(self.get_serializer(sub).data)
