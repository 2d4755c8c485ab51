"""REST API for auditors: compliance reports, evidence bundles, archives, digests and keys.

Mounted under ``/api/v1/audit/`` (``audit.urls``). Reading needs ``audit.view_audit_trail``,
exporting ``audit.export_audit``, signing a digest now ``audit.verify_audit``; exports and
signing are writes, so a read-only token is refused them. Each view states the scope a token
needs (``token_scopes``, see ``accounts.scopes``). None of these endpoints drives a VM.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import FileResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.reverse import reverse
from rest_framework.views import APIView

from audit import access_review, commands, compliance, exports, integrity, keys, retention
from audit.actor import Actor
from audit.commands import sign_digest
from audit.digests import ChainBroken
from audit.models import Digest, ExportJob
from audit.scopes import AUDIT_READ, EXPORT
from core.permissions import HasPerm
from core.scopes import needs

CONTENT_TYPES = {
    "json": "application/json",
    "csv": "text/csv; charset=utf-8",
    "pdf": "application/pdf",
    "zip": "application/zip",
}


def _perms(*perms: str) -> list[type]:
    # A token's read-only flag and scopes are applied by its authentication (token_scopes).
    return [IsAuthenticated] + [HasPerm.of(p) for p in perms]


class ExportJobSerializer(serializers.ModelSerializer):
    requested_by = serializers.CharField(source="requested_by.username", read_only=True)
    since = serializers.CharField(source="params.since", read_only=True)
    until = serializers.CharField(source="params.until", read_only=True)
    percent = serializers.IntegerField(read_only=True)
    url = serializers.SerializerMethodField()
    download_url = serializers.SerializerMethodField()

    class Meta:
        model = ExportJob
        fields = [
            "id",
            "kind",
            "format",
            "framework",
            "since",
            "until",
            "status",
            "total",
            "processed",
            "percent",
            "requested_by",
            "created_at",
            "started_at",
            "finished_at",
            "file_name",
            "size",
            "sha256",
            "first_position",
            "last_position",
            "error",
            "url",
            "download_url",
        ]
        read_only_fields = fields

    def get_url(self, job: ExportJob) -> str:
        return reverse("audit-api:export-detail", [job.pk], request=self.context.get("request"))

    def get_download_url(self, job: ExportJob) -> str | None:
        if job.status != ExportJob.Status.DONE:
            return None
        return reverse("audit-api:export-download", [job.pk], request=self.context.get("request"))


class ReportRequestSerializer(serializers.Serializer):
    framework = serializers.ChoiceField(choices=list(compliance.FRAMEWORKS))
    format = serializers.ChoiceField(choices=list(exports.REPORT_FORMATS), default="json")
    since = serializers.CharField(help_text="ISO 8601 date or date-time (UTC if no offset)")
    until = serializers.CharField(help_text="ISO 8601 date or date-time, excluded")


class BundleRequestSerializer(serializers.Serializer):
    since = serializers.CharField(help_text="ISO 8601 date or date-time (UTC if no offset)")
    until = serializers.CharField(help_text="ISO 8601 date or date-time, excluded")


class ArchiveRequestSerializer(serializers.Serializer):
    before = serializers.DateTimeField(help_text="archive every event recorded before this")


def _start(request: Request, kind: str) -> Response:
    data = request.data if hasattr(request.data, "get") else {}
    try:
        req = exports.clean_request(kind, data)
    except DjangoValidationError as exc:
        raise ValidationError(exc.message_dict) from exc
    job = exports.request_export(Actor.from_request(request), request.user, req)
    body = ExportJobSerializer(job, context={"request": request}).data
    if job.status == ExportJob.Status.DONE:
        return Response(body, status=status.HTTP_201_CREATED)
    if exports.refused(job):
        return Response({"detail": job.error, "job": body}, status=status.HTTP_409_CONFLICT)
    if job.status == ExportJob.Status.FAILED:
        return Response(body, status=status.HTTP_500_INTERNAL_SERVER_ERROR)
    return Response(body, status=status.HTTP_202_ACCEPTED)


class ReportView(APIView):
    """Produce a compliance report for a period (201 when done inline, 202 when queued)."""

    permission_classes = _perms("audit.export_audit")
    token_scopes = {"post": EXPORT}

    @extend_schema(
        request=ReportRequestSerializer,
        responses={201: ExportJobSerializer, 202: ExportJobSerializer},
    )
    def post(self, request: Request) -> Response:
        return _start(request, "report")


class BundleView(APIView):
    """Produce an evidence bundle (zip) for a period, widened to whole signed digests."""

    permission_classes = _perms("audit.export_audit")
    token_scopes = {"post": EXPORT}

    @extend_schema(
        request=BundleRequestSerializer,
        responses={201: ExportJobSerializer, 202: ExportJobSerializer},
    )
    def post(self, request: Request) -> Response:
        return _start(request, "bundle")


class ArchiveView(APIView):
    """Produce an archive bundle of every event recorded before a date."""

    permission_classes = _perms("audit.export_audit")
    token_scopes = {"post": EXPORT}

    @extend_schema(
        request=ArchiveRequestSerializer,
        responses={201: ExportJobSerializer, 202: ExportJobSerializer},
    )
    def post(self, request: Request) -> Response:
        return _start(request, "archive")


class ExportJobViewSet(viewsets.ReadOnlyModelViewSet):
    """Export jobs with their progress; ``download`` streams a finished file."""

    queryset = ExportJob.objects.select_related("requested_by").order_by("-created_at")
    serializer_class = ExportJobSerializer
    permission_classes = _perms("audit.export_audit")
    filterset_fields = ["kind", "status", "format"]
    token_scopes = {"list": EXPORT, "retrieve": EXPORT, "download": EXPORT}

    @extend_schema(
        # A JSON report is a JSON document; CSV, PDF and bundles are files.
        responses={
            (200, ct): OpenApiTypes.OBJECT if fmt == "json" else OpenApiTypes.BINARY
            for fmt, ct in CONTENT_TYPES.items()
        }
    )
    @action(detail=True, methods=["get"])
    def download(self, request: Request, pk: Any = None) -> Any:
        job = self.get_object()
        if job.status != ExportJob.Status.DONE:
            return Response(
                {"detail": f"the export is {job.status}", "status": job.status},
                status=status.HTTP_409_CONFLICT,
            )
        path = exports.export_path(job)
        if not path.exists():
            return Response(
                {"detail": "the export file is no longer on this server"},
                status=status.HTTP_410_GONE,
            )
        commands.record_export_downloaded(request, job)
        return download_response(job, path)


def download_response(job: ExportJob, path: Path) -> FileResponse:
    """A finished export's file as an attachment, with its SHA-256 in a header."""
    response = FileResponse(
        path.open("rb"),
        as_attachment=True,
        filename=job.file_name,
        content_type=CONTENT_TYPES[job.format],
    )
    response["X-Content-SHA256"] = job.sha256
    return response


class FrameworkView(APIView):
    """The control mapping: frameworks, controls, what each asks and counts, exception rules."""

    permission_classes = _perms("audit.view_audit_trail")
    token_scopes = {"get": AUDIT_READ}

    @extend_schema(
        responses=inline_serializer("Frameworks", {"frameworks": serializers.JSONField()})
    )
    def get(self, request: Request) -> Response:
        return Response(
            {
                "frameworks": [
                    {
                        "key": f.key,
                        "name": f.name,
                        "controls": [
                            {
                                "id": c.id,
                                "title": c.title,
                                "asks": c.asks,
                                "counts": c.counts,
                                "counted": [s.describe() for s in c.counted],
                                "event_types": sorted(c.event_types)
                                if c.event_types is not None
                                else None,
                                "manual_checks": c.manual,
                                "access_review": c.access_review,
                            }
                            for c in f.controls
                        ],
                    }
                    for f in compliance.FRAMEWORKS.values()
                ],
                "exception_rules": [
                    {"kind": r.kind, "title": r.title, "event_types": sorted(r.event_types)}
                    for r in (*compliance.EXCEPTION_RULES, compliance.NO_VERIFICATION)
                ],
            }
        )


class DigestSerializer(serializers.ModelSerializer):
    class Meta:
        model = Digest
        fields = [
            "id",
            "start_position",
            "end_position",
            "event_count",
            "start_prev_hash",
            "end_hash",
            "algorithm",
            "key_id",
            "document",
            "signature",
            "created_at",
        ]
        read_only_fields = fields


class DigestViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    viewsets.GenericViewSet,
):
    """Signed digests, newest first; POST signs the events since the last one now."""

    queryset = Digest.objects.order_by("-end_position")
    serializer_class = DigestSerializer
    token_scopes = {
        "list": AUDIT_READ,
        "retrieve": AUDIT_READ,
        "create": needs("audit.verify_audit"),
    }

    def get_permissions(self) -> list[Any]:
        if self.action == "create":
            return [p() for p in _perms("audit.verify_audit")]
        return [p() for p in _perms("audit.view_audit_trail")]

    @extend_schema(request=None, responses={201: DigestSerializer, 200: DigestSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        try:
            digest = sign_digest(request)
        except ChainBroken as exc:
            # Refused and recorded (audit.digest_signing_failed): the chain is already broken.
            problem = exc.problem
            return Response(
                {
                    "detail": f"refused: the chain is broken: {problem}",
                    "problem": {
                        "position": problem.position,
                        "kind": problem.kind,
                        "detail": problem.detail,
                    },
                },
                status=status.HTTP_409_CONFLICT,
            )
        if digest is None:
            return Response(
                {"detail": "nothing to sign: no events since the last digest"},
                status=status.HTTP_200_OK,
            )
        return Response(DigestSerializer(digest).data, status=status.HTTP_201_CREATED)


class KeyView(APIView):
    """The public keys that sign digests and bundles, with SHA-256 fingerprints to pin."""

    permission_classes = _perms("audit.view_audit_trail")
    token_scopes = {"get": AUDIT_READ}

    @extend_schema(responses=inline_serializer("DigestKeys", {"keys": serializers.JSONField()}))
    def get(self, request: Request) -> Response:
        return Response({"keys": [k.as_dict() for k in keys.public_key_infos()]})


class AccessView(APIView):
    """Users, roles and API tokens (with scopes) as the log states them at ``at`` (default now),
    and their grants and revocations from ``since`` (default: 90 days before ``at``)."""

    permission_classes = _perms("audit.view_audit_trail")
    token_scopes = {"get": AUDIT_READ}

    @extend_schema(
        parameters=[
            OpenApiParameter("at", str, description="ISO 8601 date or date-time (default now)"),
            OpenApiParameter("since", str, description="changes from (default at - 90 days)"),
        ],
        responses=inline_serializer(
            "AccessReview",
            {
                "at": serializers.CharField(),
                "since": serializers.CharField(allow_null=True),
                "users": serializers.ListField(child=serializers.DictField()),
                "roles": serializers.JSONField(),
                "tokens": serializers.ListField(child=serializers.DictField()),
                "changes": serializers.ListField(child=serializers.DictField()),
            },
        ),
    )
    def get(self, request: Request) -> Response:
        errors: dict[str, str] = {}
        at = datetime.now(UTC)
        if request.query_params.get("at"):
            at = exports.parse_time(request.query_params["at"], "at", errors) or at
        since = at - timedelta(days=90)
        if request.query_params.get("since"):
            since = exports.parse_time(request.query_params["since"], "since", errors) or since
        if not errors and since > at:
            errors["since"] = "must not be after at"
        if errors:
            raise ValidationError(errors)
        review = access_review.build(at, since).as_dict()
        commands.record_accounts_listed(
            request,
            "api.access",
            {
                "at": review["at"],
                "since": review["since"],
                "users": len(review["users"]),
                "tokens": len(review["tokens"]),
            },
        )
        return Response(review)


class RetentionView(APIView):
    """Retention period and cut-off, pruning (not implemented), legal holds and archives."""

    permission_classes = _perms("audit.view_audit_trail")
    token_scopes = {"get": AUDIT_READ}

    @extend_schema(responses=inline_serializer("Retention", {"years": serializers.IntegerField()}))
    def get(self, request: Request) -> Response:
        return Response(retention.status())


class LegalHoldRequestSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=500)


class LegalHoldReleaseSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")


class LegalHoldView(APIView):
    """Place a legal hold on the log (it is an event: ``audit.legal_hold_placed``)."""

    permission_classes = _perms("audit.export_audit")
    token_scopes = {"post": EXPORT}

    @extend_schema(
        request=LegalHoldRequestSerializer,
        responses={201: inline_serializer("LegalHoldPlaced", {"hold_id": serializers.CharField()})},
    )
    def post(self, request: Request) -> Response:
        s = LegalHoldRequestSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        try:
            hold_id = commands.place_legal_hold(request, s.validated_data["reason"])
        except ValueError as exc:
            raise ValidationError({"reason": str(exc)}) from exc
        return Response({"hold_id": hold_id}, status=status.HTTP_201_CREATED)


class LegalHoldReleaseView(APIView):
    """Release an active legal hold (``audit.legal_hold_released``); 404 when none is active."""

    permission_classes = _perms("audit.export_audit")
    token_scopes = {"post": EXPORT}

    @extend_schema(
        request=LegalHoldReleaseSerializer,
        responses={
            200: inline_serializer(
                "LegalHoldReleased",
                {"hold_id": serializers.CharField(), "released": serializers.BooleanField()},
            )
        },
    )
    def post(self, request: Request, hold_id: str) -> Response:
        s = LegalHoldReleaseSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        try:
            released = commands.release_legal_hold(request, hold_id, s.validated_data["reason"])
        except ValueError as exc:
            raise ValidationError({"reason": str(exc)}) from exc
        if not released:
            return Response(
                {"detail": f"no active legal hold {hold_id!r}"}, status=status.HTTP_404_NOT_FOUND
            )
        return Response({"hold_id": hold_id, "released": True})


class BreakAcknowledgeSerializer(serializers.Serializer):
    position = serializers.IntegerField(min_value=0)
    kind = serializers.RegexField(r"^[a-z_]{1,40}$")
    reason = serializers.CharField(max_length=500)


class _AdminOnly(IsAuthenticated):
    # The admin role (Django's superuser flag follows it): an auditor may not excuse a break.
    def has_permission(self, request: Any, view: Any) -> bool:
        return super().has_permission(request, view) and bool(request.user.is_superuser)


class BreakView(APIView):
    """The break on record that stops exports and signing (``open``), and the breaks an
    administrator acknowledged. POST (admins) acknowledges the open break, with a reason:
    ``audit.break_acknowledged``; exports and signing go on and every later report states it."""

    token_scopes = {"get": AUDIT_READ, "post": needs("audit.verify_audit")}

    def get_permissions(self) -> list[Any]:
        if self.request.method == "POST":
            return [_AdminOnly(), HasPerm.of("audit.verify_audit")()]
        return [p() for p in _perms("audit.view_audit_trail")]

    @extend_schema(
        responses=inline_serializer(
            "ChainBreaks",
            {"open": serializers.JSONField(), "acknowledged": serializers.JSONField()},
        )
    )
    def get(self, request: Request) -> Response:
        found = integrity.known_break()
        return Response(
            {
                "open": None
                if found is None
                else {
                    "position": found.position,
                    "kind": found.kind,
                    "problem": found.problem,
                    "recorded_by_event": found.event_position,
                },
                "acknowledged": integrity.acknowledged_breaks(),
            }
        )

    @extend_schema(
        request=BreakAcknowledgeSerializer,
        responses={201: inline_serializer("BreakAcknowledged", {"ack": serializers.JSONField()})},
    )
    def post(self, request: Request) -> Response:
        s = BreakAcknowledgeSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        try:
            data = commands.acknowledge_break(
                request,
                position=s.validated_data["position"],
                kind=s.validated_data["kind"],
                reason=s.validated_data["reason"],
            )
        except ValueError as exc:
            raise ValidationError({"reason": str(exc)}) from exc
        except LookupError as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        return Response({"ack": data}, status=status.HTTP_201_CREATED)
