"""REST API over the event log: list and filter events, verify the chain."""

from __future__ import annotations

from typing import Any

import django_filters
from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from audit.commands import has_control, read_details, record_trail_read, verify_chain
from audit.hashing import EVENT_COLUMNS
from audit.models import Event
from audit.scopes import AUDIT_READ
from core.permissions import HasPerm
from core.scopes import needs


class EventSerializer(serializers.ModelSerializer):
    data = serializers.JSONField(source="payload")

    class Meta:
        model = Event
        fields = list(EVENT_COLUMNS)
        read_only_fields = fields


def _no_control(value: str) -> None:
    if has_control(value):
        raise DjangoValidationError("control characters are not allowed")


def _text(**kwargs: Any) -> django_filters.CharFilter:
    # Filter values are recorded in the read's event: bounded, without control characters.
    return django_filters.CharFilter(max_length=200, validators=[_no_control], **kwargs)


class EventFilter(django_filters.FilterSet):
    type = _text()
    type_prefix = _text(field_name="type", lookup_expr="startswith")
    aggregate_type = _text()
    aggregate_id = _text()
    actor = _text(field_name="actor_name")
    correlation_id = _text()
    after = django_filters.NumberFilter(field_name="position", lookup_expr="gt")
    since = django_filters.IsoDateTimeFilter(field_name="recorded_at", lookup_expr="gte")
    until = django_filters.IsoDateTimeFilter(field_name="recorded_at", lookup_expr="lt")

    class Meta:
        model = Event
        fields: list[str] = []


class EventViewSet(viewsets.ReadOnlyModelViewSet):
    """The audit trail, oldest first (filter with ``after`` to follow it)."""

    queryset = Event.objects.order_by("position")
    serializer_class = EventSerializer
    filterset_class = EventFilter
    permission_classes = [HasPerm.of("audit.view_audit_trail")]
    token_scopes = {
        "list": AUDIT_READ,
        "retrieve": AUDIT_READ,
        "verify": needs("audit.verify_audit"),
    }

    # Reading the trail is itself an event (PCI DSS 10.2.1.3): one per request, appended before
    # the answer leaves, so a read the log cannot record is not served.
    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        response = super().list(request, *args, **kwargs)
        data = response.data
        rows = data.get("results", []) if isinstance(data, dict) else data
        record_trail_read(request, "api.events.list", read_details(self._filters(request), rows))
        return response

    def _filters(self, request: Request) -> dict[str, Any]:
        """The filters and page the list applied, as validated (the list ran, so they are)."""
        filterset = EventFilter(request.query_params, queryset=self.get_queryset())
        applied = dict(filterset.form.cleaned_data) if filterset.is_valid() else {}
        for name in ("limit", "offset"):
            value = request.query_params.get(name, "")
            if value.isdigit():
                applied[name] = int(value)
        return applied

    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        response = super().retrieve(request, *args, **kwargs)
        record_trail_read(request, "api.events.retrieve", {"position": response.data["position"]})
        return response

    @extend_schema(
        request=None,
        responses=inline_serializer(
            "ChainVerification",
            {
                "ok": serializers.BooleanField(),
                "checked": serializers.IntegerField(),
                "last_position": serializers.IntegerField(),
                "problem": serializers.CharField(allow_null=True),
            },
        ),
    )
    @action(detail=False, methods=["post"], permission_classes=[HasPerm.of("audit.verify_audit")])
    def verify(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        report = verify_chain(request)
        return Response(
            {
                "ok": report.ok,
                "checked": report.checked,
                "last_position": report.last_position,
                "digests_checked": report.digests_checked,
                "problem": str(report.problem) if report.problem else None,
            }
        )
