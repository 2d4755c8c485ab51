"""REST API of the VM domain: VMs and their actions, snapshots, templates, quotas, requests.

Views parse and validate input, then call ``vms.commands`` (state changes) or ``vms.guest``
(exec, files); they never append events or write read models. Long actions answer 202 with the
request event and a status URL.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
import uuid
from pathlib import Path
from typing import Any

import django_filters
from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import ImproperlyConfigured
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import StopUpload, TemporaryFileUploadHandler
from django.db.models import Q
from django.http import FileResponse, Http404
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import APIException, NotFound, ValidationError
from rest_framework.parsers import FileUploadParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.caller import Caller
from accounts.models import User
from accounts.scopes import OPEN, VM_READ, Needs, needs
from audit.api import EventSerializer
from audit.commands import read_details, record_trail_read
from audit.models import Event
from core.compiled import CompiledQuery, cached
from core.pagination import NOT_FILTERS, TOTAL, with_total
from secretstore import guests
from vms import commands, forks, guest, lifecycle, policy, pools, quotas
from vms.models import PRIORITY_CHOICES, RequestOutcome, Snapshot, Template, VirtualMachine
from vms.representation import (
    SNAPSHOT_BRIEF_FIELDS,
    SNAPSHOT_FIELDS,
    VM_COLUMNS,
    VM_FIELDS,
    represent_vm,
    vm_representation,
)

# --- Serializers ------------------------------------------------------------------------------


class SnapshotBriefSerializer(serializers.ModelSerializer):
    class Meta:
        model = Snapshot
        fields = SNAPSHOT_BRIEF_FIELDS
        read_only_fields = fields


# The fields declare the schema; ``vms.representation`` computes them (instances included).
class VMSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    owner_id = serializers.IntegerField(read_only=True)
    url = serializers.CharField(read_only=True)

    class Meta:
        model = VirtualMachine
        fields = VM_FIELDS
        read_only_fields = fields

    def to_representation(self, vm: VirtualMachine) -> dict[str, Any]:
        return represent_vm(vm)


# --- Compiled reads: the default list page and one VM ----------------------------------------

# Stand-ins compiled into the SQL where a request's values go (core.compiled).
OWNER_STAND_IN = -7_319_446_581
VM_STAND_IN = uuid.UUID("5a4d0000-0000-4000-8000-0000c0ffee00")


def _visible(everyone: bool) -> Any:
    return policy.vms_seen(everyone, OWNER_STAND_IN)


@cached
def _page_query(everyone: bool, limit: int, offset: int) -> CompiledQuery:
    """The list without filters: live VMs, newest first, with the count (one query)."""
    qs = _visible(everyone).exclude(state=lifecycle.GONE).order_by("-created_at")
    page = with_total(qs).values(*VM_COLUMNS, TOTAL)[offset : offset + limit]
    return CompiledQuery(page, {} if everyone else {"owner": OWNER_STAND_IN})


@cached
def _one_query(everyone: bool) -> CompiledQuery:
    qs = _visible(everyone).filter(pk=VM_STAND_IN).values(*VM_COLUMNS)
    return CompiledQuery(qs, {"vm": VM_STAND_IN} | ({} if everyone else {"owner": OWNER_STAND_IN}))


class SecretRefsField(serializers.ListField):
    """``[{"name": ..., "env": "VAR"} | {"name": ..., "file": "/abs/path"}, ...]``, with
    ``"group"`` to pick a group's secret (``secretstore.guests``)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("child", serializers.DictField(child=serializers.CharField()))
        kwargs.setdefault("required", False)
        kwargs.setdefault("max_length", guests.MAX_REFS)
        kwargs.setdefault(
            "help_text",
            "secrets to give the guest, by name: each as an environment variable (env) or a "
            "file (file); values never appear in a response, an event or the output (masked)",
        )
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> Any:
        refs = super().to_internal_value(data)
        try:
            return guests.validate_refs(refs)
        except DjangoValidationError as exc:
            raise ValidationError(exc.message_dict.get("secrets", exc.messages)) from exc


class VMCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=63)
    template = serializers.CharField(max_length=63, default="linux-default")
    vcpus = serializers.IntegerField(min_value=1, required=False)
    memory_mib = serializers.IntegerField(min_value=128, required=False)
    disk_mib = serializers.IntegerField(min_value=64, required=False)
    start = serializers.BooleanField(default=True)
    network = serializers.SlugField(
        max_length=63, required=False, help_text="a network's name; default: the default network"
    )
    secrets = SecretRefsField()
    budget = serializers.CharField(
        max_length=150,
        required=False,
        help_text=(
            "the group whose team budget the VM draws from; default: your only group with a "
            "team budget (required when you are in several)"
        ),
    )
    timeout_s = serializers.IntegerField(
        min_value=0,
        required=False,
        help_text=(
            "its lifetime in seconds: at its end it is stopped or destroyed (its template "
            "says which); 0: none; default: its template's"
        ),
    )
    priority = serializers.ChoiceField(
        choices=PRIORITY_CHOICES,
        required=False,
        help_text="who gives way first under host pressure (low first; high never); "
        "default: its template's",
    )
    pressure_opt_out = serializers.BooleanField(
        required=False,
        default=None,
        allow_null=True,
        help_text="true: never ballooned under host pressure; default: its template's",
    )


class PrioritySerializer(serializers.Serializer):
    priority = serializers.ChoiceField(choices=PRIORITY_CHOICES, required=False)
    pressure_opt_out = serializers.BooleanField(required=False, default=None, allow_null=True)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("priority") is None and attrs.get("pressure_opt_out") is None:
            raise serializers.ValidationError(
                {"priority": "give priority, pressure_opt_out or both"}
            )
        return attrs


class LifetimeSerializer(serializers.Serializer):
    timeout_s = serializers.IntegerField(
        min_value=0,
        help_text="its lifetime from now, in seconds (0 clears it; at most "
        "SANDBOX_VM_LIFETIME_MAX_S)",
    )


class ForkSerializer(serializers.Serializer):
    count = serializers.IntegerField(
        min_value=1, help_text="how many new VMs (at most SANDBOX_FORK_MAX)"
    )
    names = serializers.ListField(
        child=serializers.CharField(max_length=63),
        required=False,
        max_length=1000,
        help_text="one name per new VM (default: <source>-fork-<k>)",
    )
    budget = serializers.CharField(
        required=False,
        max_length=150,
        help_text="the team budget the new VMs draw from (default: the source's)",
    )


class IdleSerializer(serializers.Serializer):
    idle_timeout_s = serializers.IntegerField(
        min_value=1,
        allow_null=True,
        help_text=(
            "seconds without exec, file transfer or console input before the system pauses "
            "the VM (the next exec or file request resumes it); null: never"
        ),
    )
    idle_to_disk = serializers.BooleanField(
        default=False,
        help_text=(
            "the idle pause suspends the VM to disk: its memory and device state saved to a "
            "file, its VMM stopped and its memory freed; the next exec or file request "
            "restores it (needs idle_timeout_s)"
        ),
    )


class StopSerializer(serializers.Serializer):
    force = serializers.BooleanField(default=False)
    grace_s = serializers.IntegerField(min_value=0, max_value=600, required=False)


class ResizeSerializer(serializers.Serializer):
    vcpus = serializers.IntegerField(min_value=1, required=False)
    memory_mib = serializers.IntegerField(min_value=128, required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if not attrs:
            raise ValidationError("give vcpus, memory_mib or both")
        return attrs


class SnapshotCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=63, required=False, allow_blank=True)


class ExecSerializer(serializers.Serializer):
    argv = serializers.ListField(
        child=serializers.CharField(allow_blank=True, max_length=65536),
        min_length=1,
        max_length=4096,
    )
    cwd = serializers.CharField(required=False, max_length=4096)
    env = serializers.DictField(
        child=serializers.CharField(allow_blank=True, max_length=65536), required=False
    )
    stdin = serializers.CharField(
        required=False, allow_blank=True, trim_whitespace=False, help_text="text"
    )
    stdin_b64 = serializers.CharField(required=False, help_text="bytes, base64")
    timeout = serializers.FloatField(min_value=0.1, default=60.0)
    secrets = SecretRefsField()

    def validate_timeout(self, value: float) -> float:
        from django.conf import settings

        if value > settings.SANDBOX_EXEC_MAX_TIMEOUT_S:
            raise ValidationError(f"at most {settings.SANDBOX_EXEC_MAX_TIMEOUT_S} seconds")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "stdin" in attrs and "stdin_b64" in attrs:
            raise ValidationError("give stdin or stdin_b64, not both")
        if "stdin_b64" in attrs:
            try:
                attrs["stdin_bytes"] = base64.b64decode(attrs.pop("stdin_b64"), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValidationError({"stdin_b64": "not valid base64"}) from exc
        elif "stdin" in attrs:
            attrs["stdin_bytes"] = attrs.pop("stdin").encode()
        for key in attrs.get("env", {}):
            if not key or "=" in key or "\x00" in key:
                raise ValidationError({"env": f"invalid variable name {key!r}"})
        if any("\x00" in a for a in attrs["argv"]):
            raise ValidationError({"argv": "NUL characters are not allowed"})
        return attrs


class SnapshotSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)

    class Meta:
        model = Snapshot
        fields = SNAPSHOT_FIELDS
        read_only_fields = fields


class CloneSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=63)
    budget = serializers.CharField(
        max_length=150, required=False, help_text="as for a create: the team budget it draws from"
    )
    timeout_s = serializers.IntegerField(
        min_value=0,
        required=False,
        help_text=(
            "its lifetime in seconds, as for a create; default: the lifetime of the template "
            "the snapshot's VM came from"
        ),
    )


class TemplateSerializer(serializers.ModelSerializer):
    class Meta:
        model = Template
        fields = [
            "name",
            "description",
            "boot",
            "image",
            "vcpus",
            "memory_mib",
            "disk_mib",
            "source",
            "enabled",
            "secrets",
        ]
        read_only_fields = fields


def _request_brief(request: Any) -> dict[str, Any]:
    return {"event_id": request.event_id, "type": request.type, "position": request.position}


def accepted(result: commands.Accepted, status_code: int = status.HTTP_202_ACCEPTED) -> Response:
    body: dict[str, Any] = {
        "request": _request_brief(result.request),
        "status_url": f"/api/v1/requests/{result.request.event_id}/",
        "vm": VMSerializer(result.vm).data,
    }
    if result.snapshot is not None:
        body["snapshot"] = SnapshotBriefSerializer(result.snapshot).data
    return Response(body, status=status_code)


# --- Filters ----------------------------------------------------------------------------------


class VMFilter(django_filters.FilterSet):
    state = django_filters.CharFilter()
    owner = django_filters.CharFilter(field_name="owner__username")
    owner_id = django_filters.NumberFilter()
    template = django_filters.CharFilter()
    name = django_filters.CharFilter(field_name="name", lookup_expr="icontains")
    include_destroyed = django_filters.BooleanFilter(method="filter_destroyed")

    class Meta:
        model = VirtualMachine
        fields: list[str] = []

    def filter_destroyed(self, queryset: Any, name: str, value: bool) -> Any:
        return queryset  # read by VMViewSet.get_queryset: lists hide destroyed VMs by default


class SnapshotFilter(django_filters.FilterSet):
    vm_id = django_filters.UUIDFilter(field_name="vm_id")
    state = django_filters.CharFilter()
    owner = django_filters.CharFilter(field_name="owner__username")

    class Meta:
        model = Snapshot
        fields: list[str] = []


# --- Views ------------------------------------------------------------------------------------


class UploadTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "upload_too_large"


class UploadSpool(TemporaryFileUploadHandler):
    """Spools an upload to a temporary file, at most SANDBOX_UPLOAD_MAX_BYTES of it (413
    beyond: nothing more is written), and keeps the files it made so the view closes (and so
    deletes) them when the request ends, whether it succeeded, failed or was cut off; left to
    the garbage collector they stayed open long after a failed request."""

    def __init__(self, request: Any, max_bytes: int) -> None:
        super().__init__(request)
        self.max_bytes = max_bytes
        self.received = 0
        self.made: list[Any] = []

    def new_file(self, *args: Any, **kwargs: Any) -> None:
        super().new_file(*args, **kwargs)
        self.made.append(self.file)

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes | None:
        self.received += len(raw_data)
        if self.received > self.max_bytes:
            raise UploadTooLarge(f"an upload is at most {self.max_bytes} bytes")
        return super().receive_data_chunk(raw_data, start)

    def close_all(self) -> None:
        for made in self.made:
            made.close()  # a TemporaryUploadedFile is deleted when closed


class RawUploadParser(FileUploadParser):
    """A raw request body as the uploaded file (``curl -T`` or ``--data-binary``).

    The destination is the ``path`` query parameter, so no Content-Disposition filename is
    needed; Django's upload handlers spool a large body to a temporary file.
    """

    def get_filename(self, stream: Any, media_type: Any, parser_context: Any) -> str:
        return super().get_filename(stream, media_type, parser_context) or "upload"

    def parse(self, stream: Any, media_type: Any = None, parser_context: Any = None) -> Any:
        parsed = super().parse(stream, media_type, parser_context)
        meta = parser_context["request"].META
        announced = meta.get("CONTENT_LENGTH") or meta.get("HTTP_CONTENT_LENGTH")
        upload = parsed.files.get("file")
        if announced and upload is not None and upload.size != int(announced):
            # A body shorter than announced is a cut-off upload, never a complete file.
            raise ValidationError({"file": "the body is shorter than its Content-Length"})
        return parsed


def scopes_of(resource: str) -> dict[str, Needs]:
    """The token scopes of a viewset's verb actions, from the lifecycle table: each action and
    method needs the verb's permission."""
    return {
        f"{v.api.action}:{method}": policy.scope_of(v.name)
        for v in lifecycle.VERBS
        if v.api is not None and v.api.resource == resource
        for method in v.api.methods
    }


class VMViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Your VMs (everyone's for viewers, auditors and admins). DELETE destroys."""

    queryset = VirtualMachine.objects.none()  # for the schema; get_queryset says whose
    serializer_class = VMSerializer
    filterset_class = VMFilter
    # Reads, and every verb the lifecycle table offers here (the worker's verbs are actions
    # made from the table below the class).
    token_scopes = {
        "list": VM_READ,
        "retrieve": VM_READ,
        "events": VM_READ,
        "fork_status": VM_READ,
        **scopes_of("vms"),
    }

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        if not NOT_FILTERS.issuperset(request.query_params):
            return super().list(request, *args, **kwargs)  # filters: the ORM's way
        caller = Caller.from_request(request)
        everyone = policy.sees_all_vms(caller)
        paginator = self.paginator
        assert paginator is not None
        limit = paginator.get_limit(request)
        offset = paginator.get_offset(request)
        rows = _page_query(everyone, limit, offset).run(owner=caller.user.pk)
        if not rows and offset:
            return super().list(request, *args, **kwargs)  # past the end: counted apart
        paginator.request, paginator.limit, paginator.offset = request, limit, offset
        paginator.count = rows[0][TOTAL] if rows else 0
        return paginator.get_paginated_response([vm_representation(row) for row in rows])

    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        try:
            vm_id = uuid.UUID(str(kwargs["pk"]))
        except ValueError:
            raise Http404("No VirtualMachine matches the given query.") from None
        caller = Caller.from_request(request)
        rows = _one_query(policy.sees_all_vms(caller)).run(vm=vm_id, owner=caller.user.pk)
        if not rows:
            raise Http404("No VirtualMachine matches the given query.")
        return Response(vm_representation(rows[0]))

    def get_queryset(self) -> Any:
        qs = policy.visible_vms(Caller.from_request(self.request)).order_by("-created_at")
        params = self.request.query_params
        if (
            self.action == "list"
            and "state" not in params
            and params.get("include_destroyed") not in ("true", "1", "True")
        ):
            qs = qs.exclude(state=lifecycle.GONE)
        return qs

    def caller(self) -> Caller:
        return Caller.from_request(self.request)

    def target(self, verb: str) -> VirtualMachine:
        """The VM of this request once the caller may ask ``verb`` of it (``vms.policy``),
        decided before any body is validated: 404 when the caller cannot see it, 403 without
        the permission or when it is not theirs to act on. The command checks again (with the
        state) under the event store's lock."""
        vm = self.get_object()
        policy.require(self.caller(), verb, vm.owner_id)
        return vm

    @extend_schema(
        request=VMCreateSerializer,
        # 202 when a start was asked for (it follows at status_url); 201 when the VM is created
        # stopped, its request already done.
        responses=dict.fromkeys(
            (201, 202), inline_serializer("Accepted", {"status_url": serializers.CharField()})
        ),
    )
    def create(self, request: Request) -> Response:
        s = VMCreateSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        d = s.validated_data
        result = pools.create(
            self.caller(),
            name=d["name"],
            template=d["template"],
            vcpus=d.get("vcpus"),
            memory_mib=d.get("memory_mib"),
            disk_mib=d.get("disk_mib"),
            start_now=d["start"],
            network=d.get("network"),
            secrets=d.get("secrets"),
            budget=d.get("budget"),
            timeout_s=d.get("timeout_s"),
            priority=d.get("priority"),
            pressure_opt_out=d.get("pressure_opt_out"),
        )
        # 201 also for a start served from a warm pool: the VM answers running.
        done = not d["start"] or result.pooled is not None
        return accepted(result, status.HTTP_201_CREATED if done else status.HTTP_202_ACCEPTED)

    @extend_schema(
        request=ForkSerializer,
        responses={
            202: inline_serializer(
                "Forked",
                {
                    "status_url": serializers.CharField(),
                    "fork_status_url": serializers.CharField(),
                },
            )
        },
    )
    @action(detail=True, methods=["post"])
    def fork(self, request: Request, pk: Any = None) -> Response:
        """``count`` new VMs from this running VM's state of now (snapshot once, restore each
        with its own identity). 202: the snapshot request (``status_url``), the whole fork's
        progress (``fork_status_url``: how many of the N run, failed, are pending) and, per new
        VM, its id, name and restore request (its own ``status_url``)."""
        vm = self.target("fork")
        s = ForkSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        d = s.validated_data
        forked = commands.fork(
            self.caller(), vm, count=d["count"], names=d.get("names"), budget=d.get("budget")
        )
        return Response(
            {
                "request": _request_brief(forked.request),
                "status_url": f"/api/v1/requests/{forked.request.event_id}/",
                "fork_status_url": forks.status_path(forked.source_id, forked.snapshot.pk),
                "source": str(forked.source_id),
                "snapshot": SnapshotBriefSerializer(forked.snapshot).data,
                "vms": [
                    {
                        "id": str(a.vm_id),
                        "name": a.vm.name,
                        "hostname": a.vm.hostname,
                        "request": _request_brief(a.request),
                        "status_url": f"/api/v1/requests/{a.request.event_id}/",
                    }
                    for a in forked.vms
                ],
            },
            status=status.HTTP_202_ACCEPTED,
        )

    @extend_schema(
        responses=inline_serializer(
            "ForkStatus",
            {
                "source": serializers.UUIDField(),
                "request_id": serializers.UUIDField(),
                "snapshot": inline_serializer(
                    "ForkStatusSnapshot",
                    {
                        "id": serializers.UUIDField(),
                        "name": serializers.CharField(),
                        "state": serializers.CharField(),
                        "last_error": serializers.CharField(),
                    },
                ),
                "count": serializers.IntegerField(help_text="N: the fork's new VMs"),
                "running": serializers.IntegerField(),
                "failed": serializers.IntegerField(help_text="failed or crashed"),
                "pending": serializers.IntegerField(help_text="their restore still asked"),
                "other": serializers.IntegerField(help_text="stopped, paused or gone since"),
                "settled": serializers.IntegerField(help_text="count less pending"),
                "done": serializers.BooleanField(help_text="none pending"),
                "vms": inline_serializer(
                    "ForkStatusVM",
                    {
                        "id": serializers.UUIDField(),
                        "name": serializers.CharField(),
                        "state": serializers.CharField(),
                        "phase": serializers.ChoiceField(["running", "failed", "pending", "other"]),
                        "last_error": serializers.CharField(),
                    },
                    many=True,
                ),
            },
        ),
        parameters=[
            OpenApiParameter(
                "snapshot_id",
                OpenApiTypes.UUID,
                OpenApiParameter.PATH,
                description="the fork's snapshot (the id in its fork_status_url)",
            )
        ],
    )
    @action(
        detail=True,
        methods=["get"],
        url_path=r"forks/(?P<snapshot_id>[^/.]+)",  # checked in the view: auth comes first
        url_name="fork-status",
    )
    def fork_status(self, request: Request, pk: Any = None, snapshot_id: str = "") -> Response:
        """A fork's progress (its ``fork_status_url``): how many of its N new VMs run, failed
        or are still being restored, counted over all N; ``vms``: those the caller sees."""
        vm = self.get_object()
        try:
            sid = uuid.UUID(snapshot_id)
        except ValueError:
            raise Http404("no such fork") from None
        body = forks.status(self.caller(), vm, sid)
        if body is None:
            raise Http404("no such fork")
        return Response(body)

    @extend_schema(
        request=IdleSerializer,
        responses=inline_serializer(
            "IdlePolicySet",
            {
                "idle_timeout_s": serializers.IntegerField(allow_null=True),
                "idle_to_disk": serializers.BooleanField(),
                "event_position": serializers.IntegerField(),
            },
        ),
    )
    @action(detail=True, methods=["post"])
    def idle(self, request: Request, pk: Any = None) -> Response:
        """Set or clear (``null``) the VM's idle policy: after ``idle_timeout_s`` seconds
        without exec, file transfer or console input the system pauses it (reason idle), and
        the next exec or file request resumes it first (reason activity). ``idle_to_disk``:
        that pause suspends it to disk (its memory freed), and the resume restores it."""
        vm = self.target("set_idle")
        s = IdleSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        event = commands.set_idle(
            self.caller(),
            vm,
            idle_timeout_s=s.validated_data["idle_timeout_s"],
            idle_to_disk=s.validated_data["idle_to_disk"],
        )
        return Response({**event.data, "event_position": event.position})

    @extend_schema(
        request=LifetimeSerializer,
        responses=inline_serializer(
            "LifetimeSet",  # not "Lifetime": the request's component (LifetimeSerializer) has it
            {
                "timeout_s": serializers.IntegerField(),
                "expires_at": serializers.DateTimeField(allow_null=True),
                "on_expiry": serializers.CharField(),
                "event_position": serializers.IntegerField(),
            },
        ),
    )
    @action(detail=True, methods=["post"])
    def lifetime(self, request: Request, pk: Any = None) -> Response:
        """Set, extend or clear (``timeout_s`` 0) the VM's lifetime, from now: at its end the
        VM is stopped or destroyed (``on_expiry``, from its template)."""
        vm = self.target("set_lifetime")
        s = LifetimeSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        event = commands.set_lifetime(self.caller(), vm, timeout_s=s.validated_data["timeout_s"])
        return Response({**event.data, "event_position": event.position})

    @extend_schema(
        request=PrioritySerializer,
        responses=inline_serializer(
            "PrioritySet",
            {
                "priority": serializers.CharField(),
                "pressure_opt_out": serializers.BooleanField(),
                "before": serializers.DictField(),
                "event_position": serializers.IntegerField(),
            },
        ),
    )
    @action(detail=True, methods=["post"])
    def priority(self, request: Request, pk: Any = None) -> Response:
        """Change the VM's priority under host pressure (high, normal, low: low gives way
        first, high never) and/or its opt-out (``pressure_opt_out``: never ballooned)."""
        vm = self.target("set_priority")
        s = PrioritySerializer(data=request.data)
        s.is_valid(raise_exception=True)
        event = commands.set_priority(
            self.caller(),
            vm,
            priority=s.validated_data.get("priority"),
            pressure_opt_out=s.validated_data.get("pressure_opt_out"),
        )
        return Response({**event.data, "event_position": event.position})

    @extend_schema(request=None, responses={202: None})
    def destroy(self, request: Request, pk: Any = None) -> Response:
        return accepted(commands.destroy(self.caller(), self.target("destroy")))

    @extend_schema(
        request=ExecSerializer,
        responses=inline_serializer(
            "ExecResult",
            {
                "exit_code": serializers.IntegerField(allow_null=True),
                "signal": serializers.IntegerField(allow_null=True),
                "timed_out": serializers.BooleanField(),
                "duration_s": serializers.FloatField(),
                "stdout": serializers.CharField(),
                "stderr": serializers.CharField(),
                "stdout_b64": serializers.CharField(),
                "stderr_b64": serializers.CharField(),
                "stdout_truncated": serializers.BooleanField(),
                "stderr_truncated": serializers.BooleanField(),
                "truncated": serializers.BooleanField(),
                "stdout_size": serializers.IntegerField(),
                "stderr_size": serializers.IntegerField(),
                "event_position": serializers.IntegerField(),
            },
        ),
    )
    @action(detail=True, methods=["post"])
    def exec(self, request: Request, pk: Any = None) -> Response:
        """Run a command in the guest and return its output: up to SANDBOX_EXEC_OUTPUT_LIMIT
        bytes of each stream, with ``truncated`` and the full sizes (the exec websocket,
        ``/ws/vms/{id}/exec/``, streams all of it)."""
        vm = self.target("exec")
        s = ExecSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        d = s.validated_data
        result = guest.run_exec(
            self.caller(),
            vm,
            d["argv"],
            cwd=d.get("cwd"),
            env=d.get("env"),
            stdin=d.get("stdin_bytes"),
            timeout=d["timeout"],
            secrets=d.get("secrets"),
        )
        return Response(
            {
                "exit_code": result.exit_code,
                "signal": result.signal,
                "timed_out": result.timed_out,
                "duration_s": result.duration_s,
                "stdout": result.stdout.decode(errors="replace"),
                "stderr": result.stderr.decode(errors="replace"),
                "stdout_b64": base64.b64encode(result.stdout).decode(),
                "stderr_b64": base64.b64encode(result.stderr).decode(),
                "stdout_truncated": result.stdout_truncated,
                "stderr_truncated": result.stderr_truncated,
                "truncated": result.truncated,
                "stdout_size": result.stdout_size,
                "stderr_size": result.stderr_size,
                "event_position": result.event_position,
            }
        )

    @extend_schema(
        parameters=[
            OpenApiParameter("path", str, required=True, description="absolute path in the guest")
        ],
        request={
            "application/octet-stream": bytes,
            "multipart/form-data": inline_serializer(
                "GuestFileUpload", {"file": serializers.FileField()}
            ),
        },
        responses={
            (200, "application/octet-stream"): OpenApiTypes.BINARY,
            201: inline_serializer(
                "GuestFileStored",
                {
                    "path": serializers.CharField(),
                    "size": serializers.IntegerField(),
                    "sha256": serializers.CharField(),
                },
            ),
        },
    )
    @action(
        detail=True,
        methods=["get", "put", "post"],
        parser_classes=[MultiPartParser, RawUploadParser],
    )
    def files(self, request: Request, pk: Any = None) -> Any:
        """GET downloads ``path``; PUT (raw body) or POST (multipart ``file``) uploads to it."""
        caller = self.caller()
        path = request.query_params.get("path", "")
        if request.method == "GET":
            vm = self.target("file_download")
            guest.validate_guest_path(path)
            # An anonymous temporary file (no name on disk); the response closes it.
            fh = tempfile.TemporaryFile(prefix="sbx-dl-")  # noqa: SIM115
            try:
                size, sha256 = guest.download(caller, vm, path, fh)
                fh.seek(0)
            except BaseException:
                fh.close()
                raise
            response = FileResponse(fh, as_attachment=True, filename=Path(path).name or "download")
            response["X-Content-SHA256"] = sha256
            response["Content-Length"] = str(size)
            return response
        # Who may write, and to where, is decided before the body is read or parsed.
        vm = self.target("file_upload")
        guest.require_guest_access(caller, vm, "file_upload")
        guest.validate_guest_path(path)
        max_bytes = settings.SANDBOX_UPLOAD_MAX_BYTES
        announced = request.META.get("CONTENT_LENGTH") or ""
        if announced.isdigit() and int(announced) > max_bytes:
            raise UploadTooLarge(f"an upload is at most {max_bytes} bytes")
        spool = UploadSpool(request._request, max_bytes)
        if not hasattr(request._request, "_files"):  # a session's CSRF check may have parsed it
            request._request.upload_handlers = [spool]
        try:
            try:
                upload = request.data.get("file")
            except StopUpload as exc:  # raised by Django's parser for a cut-off part
                raise ValidationError({"file": "the upload was cut off"}) from exc
            if upload is None:
                raise ValidationError(
                    {"file": "send the file as the body (PUT) or as multipart 'file'"}
                )
            if not isinstance(upload, UploadedFile):
                # A text field (curl -F file=/etc/x without the @): a name is never opened.
                raise ValidationError(
                    {"file": "a file part (multipart with a filename) or the raw body, not text"}
                )
            size, sha256 = guest.upload(caller, vm, path, upload)
        finally:
            spool.close_all()
        return Response(
            {"path": path, "size": size, "sha256": sha256}, status=status.HTTP_201_CREATED
        )

    @extend_schema(responses=EventSerializer(many=True))
    @action(detail=True, methods=["get"])
    def events(self, request: Request, pk: Any = None) -> Response:
        """The VM's timeline: its events (and its snapshots'), oldest first."""
        vm = self.get_object()
        snapshot_ids = [str(s) for s in Snapshot.objects.filter(vm=vm).values_list("pk", flat=True)]
        qs = Event.objects.filter(
            aggregate_type="vm", aggregate_id=str(vm.pk)
        ) | Event.objects.filter(aggregate_type="snapshot", aggregate_id__in=snapshot_ids)
        qs = qs.order_by("position")
        after = request.query_params.get("after")
        if after:
            try:
                qs = qs.filter(position__gt=int(after))
            except ValueError as exc:
                raise ValidationError({"after": "a position (integer)"}) from exc
        page = self.paginate_queryset(qs)
        # Returning events is reading the trail: one audit.trail_read per request.
        record_trail_read(
            request,
            "api.vms.events",
            read_details({"vm": str(vm.pk), "after": after}, page if page is not None else qs),
        )
        return self.get_paginated_response(EventSerializer(page, many=True).data)


# The body each worker's verb takes through the API (none: no body).
ACTION_INPUT: dict[str, type[serializers.Serializer]] = {
    "stop": StopSerializer,
    "resize": ResizeSerializer,
    "snapshot": SnapshotCreateSerializer,
}


def _verb_action(row: lifecycle.Verb) -> Any:
    """The action ``POST /vms/{id}/<verb>/`` of a worker's verb of the lifecycle table: the
    caller's right decided first, then the body (``ACTION_INPUT``), then the command; 202 with
    the request event and its status URL."""
    body = ACTION_INPUT.get(row.name)

    def act(self: VMViewSet, request: Request, pk: Any = None) -> Response:
        vm = self.target(row.name)
        params: dict[str, Any] = {}
        if body is not None:
            s = body(data=request.data)
            s.is_valid(raise_exception=True)
            params = dict(s.validated_data)
        return accepted(commands.perform(self.caller(), vm, row.name, **params))

    act.__name__ = act.__qualname__ = row.name
    routed = action(detail=True, methods=["post"])(act)
    return extend_schema(request=body, responses={202: None})(routed)


# Every worker's verb the table offers as a POST action of a VM (a destroy is the VM's DELETE).
for _row in lifecycle.REQUEST_VERBS:
    if _row.api == lifecycle.ApiRoute("vms", _row.name, ("post",)):
        if _row.name in vars(VMViewSet):
            raise ImproperlyConfigured(f"VMViewSet.{_row.name} is made from the lifecycle table")
        setattr(VMViewSet, _row.name, _verb_action(_row))


class SnapshotViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Snapshots: restore one in place, clone it into a new VM, delete it (DELETE)."""

    queryset = Snapshot.objects.none()  # for the schema; get_queryset says whose
    serializer_class = SnapshotSerializer
    filterset_class = SnapshotFilter
    token_scopes = {"list": VM_READ, "retrieve": VM_READ, **scopes_of("snapshots")}

    def get_queryset(self) -> Any:
        return policy.visible_snapshots(Caller.from_request(self.request)).order_by("-created_at")

    @extend_schema(request=None, responses={202: None})
    @action(detail=True, methods=["post"])
    def restore(self, request: Request, pk: Any = None) -> Response:
        snap = self.get_object()
        policy.require(Caller.from_request(request), "restore", snap.owner_id)
        if snap.vm is None or snap.vm.state == lifecycle.GONE:
            raise ValidationError({"snapshot": "its VM is gone: clone it into a new VM instead"})
        return accepted(commands.restore(Caller.from_request(request), snap.vm, snap))

    @extend_schema(request=CloneSerializer, responses={202: None})
    @action(detail=True, methods=["post"])
    def clone(self, request: Request, pk: Any = None) -> Response:
        snap = self.get_object()
        caller = Caller.from_request(request)
        policy.require(caller, "clone", snap.owner_id)
        s = CloneSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        return accepted(
            commands.clone(
                caller,
                snap,
                name=s.validated_data["name"],
                budget=s.validated_data.get("budget"),
                timeout_s=s.validated_data.get("timeout_s"),
            )
        )

    def destroy(self, request: Request, pk: Any = None) -> Response:
        snap = self.get_object()
        policy.require(Caller.from_request(request), "delete_snapshot", snap.owner_id)
        commands.delete_snapshot(Caller.from_request(request), snap)
        return Response(status=status.HTTP_204_NO_CONTENT)


class TemplateViewSet(viewsets.ReadOnlyModelViewSet):
    serializer_class = TemplateSerializer
    queryset = Template.objects.filter(enabled=True)
    token_scopes = {"get": OPEN}  # the catalogue: no permission needed
    lookup_field = "name"


def _limits_field(help_text: str, *, allow_null: bool = False) -> serializers.DictField:
    return serializers.DictField(
        child=serializers.IntegerField(allow_null=True), help_text=help_text, allow_null=allow_null
    )


class QuotaMeView(APIView):
    """Your limits, who set each, what you use, and what remains for a new VM of yours.

    ``quota``: your own limits per resource, each with its level in ``sources`` (``user``: your
    quota; ``group``: the most generous allowance per member of your groups; ``default``: the
    settings). ``budgets``: the team budgets of your groups (limits, what the VMs drawing from
    each hold together, what remains); ``budget``: the one your new VMs draw from by default
    (null when you are in none, or in several: then a create must name one). ``remaining``: what
    a new VM may take, the smaller of your own and that budget's; ``limited_by`` says which.
    """

    token_scopes = {"get": OPEN}

    @extend_schema(
        responses=inline_serializer(
            "QuotaMe",
            {
                "quota": serializers.DictField(),
                "used": _limits_field("what your VMs and snapshots hold"),
                "budgets": serializers.ListField(child=serializers.DictField()),
                "budget": serializers.CharField(allow_null=True),
                "remaining": _limits_field("null: no limit"),
                "limited_by": serializers.DictField(
                    child=serializers.ChoiceField(["user", "group", "default", "budget"])
                ),
            },
        )
    )
    def get(self, request: Request) -> Response:
        return Response(quotas.quota_report(request.user))


class QuotaLimitsSerializer(serializers.Serializer):
    """Every resource's limit at once: a resource left out or null is empty (a quota inherits
    it from the next level; a team budget puts no team limit on it)."""

    vms = serializers.IntegerField(
        min_value=0, max_value=commands.QUOTA_MAX, allow_null=True, required=False
    )
    vcpus = serializers.IntegerField(
        min_value=0, max_value=commands.QUOTA_MAX, allow_null=True, required=False
    )
    memory_mib = serializers.IntegerField(
        min_value=0, max_value=commands.QUOTA_MAX, allow_null=True, required=False
    )
    disk_mib = serializers.IntegerField(
        min_value=0, max_value=commands.QUOTA_MAX, allow_null=True, required=False
    )
    snapshots = serializers.IntegerField(
        min_value=0, max_value=commands.QUOTA_MAX, allow_null=True, required=False
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(self.initial_data) - set(quotas.RESOURCES))
        if unknown:
            raise ValidationError({k: "not a quota resource" for k in unknown})
        return attrs


QUOTA_ADMIN = needs(policy.QUOTA_PERMISSIONS["change"])
QUOTA_READ = needs(*policy.QUOTA_PERMISSIONS.values())


class _LimitsView(APIView):
    """GET shows the limits set at one level; PUT replaces them (a ``quota.changed`` event)."""

    token_scopes = {"get": QUOTA_READ, "put": QUOTA_ADMIN}
    scope = ""

    def target(self, pk: int) -> Any:
        raise NotImplementedError

    def current(self, target: Any) -> dict[str, Any]:
        raise NotImplementedError

    def change(self, request: Request, target: Any, limits: dict[str, Any]) -> None:
        raise NotImplementedError

    def get(self, request: Request, pk: int) -> Response:
        policy.require_quota_admin(Caller.from_request(request), "view")
        return Response(self.current(self.target(pk)))

    def put(self, request: Request, pk: int) -> Response:
        policy.require_quota_admin(Caller.from_request(request), "change")
        target = self.target(pk)
        s = QuotaLimitsSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        try:
            self.change(request, target, s.validated_data)
        except DjangoValidationError as exc:
            raise ValidationError(exc.message_dict) from exc
        return Response(self.current(target))


_LIMITS_ANSWER = {
    "scope": serializers.ChoiceField(["user", "group", "budget"]),
    "limits": _limits_field("null: empty (inherits, or no team limit)"),
}


class UserQuotaView(_LimitsView):
    """A user's own quota (admins): its limits, and what is in force for it per resource."""

    def target(self, pk: int) -> Any:
        return get_object_or_404(User, pk=pk)

    def current(self, target: Any) -> dict[str, Any]:
        return {
            "scope": "user",
            "user": target.username,
            "limits": quotas.limits_set(user=target),
            "effective": quotas.effective_quota(target).as_dict(),
        }

    def change(self, request: Request, target: Any, limits: dict[str, Any]) -> None:
        commands.set_quota(Caller.from_request(request), user=target, limits=limits)

    @extend_schema(
        responses=inline_serializer(
            "UserQuota",
            {
                **_LIMITS_ANSWER,
                "user": serializers.CharField(),
                "effective": serializers.DictField(),
            },
        )
    )
    def get(self, request: Request, pk: int) -> Response:
        return super().get(request, pk)

    @extend_schema(
        request=QuotaLimitsSerializer,
        responses=inline_serializer(
            "UserQuotaSet",
            {
                **_LIMITS_ANSWER,
                "user": serializers.CharField(),
                "effective": serializers.DictField(),
            },
        ),
    )
    def put(self, request: Request, pk: int) -> Response:
        return super().put(request, pk)


class GroupQuotaView(_LimitsView):
    """A group's quota (admins): an allowance for each member on its own."""

    def target(self, pk: int) -> Any:
        return get_object_or_404(Group, pk=pk)

    def current(self, target: Any) -> dict[str, Any]:
        return {"scope": "group", "group": target.name, "limits": quotas.limits_set(group=target)}

    def change(self, request: Request, target: Any, limits: dict[str, Any]) -> None:
        commands.set_quota(Caller.from_request(request), group=target, limits=limits)

    @extend_schema(
        responses=inline_serializer(
            "GroupQuota", {**_LIMITS_ANSWER, "group": serializers.CharField()}
        )
    )
    def get(self, request: Request, pk: int) -> Response:
        return super().get(request, pk)

    @extend_schema(
        request=QuotaLimitsSerializer,
        responses=inline_serializer(
            "GroupQuotaSet", {**_LIMITS_ANSWER, "group": serializers.CharField()}
        ),
    )
    def put(self, request: Request, pk: int) -> Response:
        return super().put(request, pk)


class GroupBudgetView(_LimitsView):
    """A group's team budget (admins): what the VMs drawing from it hold together, and what
    they hold now."""

    def target(self, pk: int) -> Any:
        return get_object_or_404(Group, pk=pk)

    def current(self, target: Any) -> dict[str, Any]:
        state = quotas.budget_state(target.pk)
        return {
            "scope": "budget",
            "group": target.name,
            "limits": quotas.limits_set(budget_of=target),
            "used": state.used if state is not None else None,
            "remaining": state.remaining() if state is not None else None,
        }

    def change(self, request: Request, target: Any, limits: dict[str, Any]) -> None:
        commands.set_group_budget(Caller.from_request(request), target, limits)

    _answer = {
        **_LIMITS_ANSWER,
        "group": serializers.CharField(),
        "used": _limits_field("null: the group has no budget", allow_null=True),
        "remaining": _limits_field("null: the group has no budget", allow_null=True),
    }

    @extend_schema(responses=inline_serializer("GroupBudget", _answer))
    def get(self, request: Request, pk: int) -> Response:
        return super().get(request, pk)

    @extend_schema(
        request=QuotaLimitsSerializer, responses=inline_serializer("GroupBudgetSet", _answer)
    )
    def put(self, request: Request, pk: int) -> Response:
        return super().put(request, pk)


class RequestStatusView(APIView):
    """Where a request stands: pending, succeeded or failed, with its outcome event."""

    token_scopes = {"get": VM_READ}

    @extend_schema(
        responses=inline_serializer(
            "RequestStatus",
            {
                "request": EventSerializer(),
                "state": serializers.ChoiceField(["pending", "succeeded", "failed"]),
                "outcome": EventSerializer(allow_null=True),
                "vm": VMSerializer(allow_null=True),
            },
        )
    )
    def get(self, request: Request, event_id: str) -> Response:
        try:
            eid = uuid.UUID(event_id)
        except ValueError as exc:
            raise NotFound("no such request") from exc
        # A create without a start is a request that was carried out when it was accepted: its
        # status URL names the vm.created event, which is its own outcome.
        event = (
            Event.objects.filter(event_id=eid)
            .filter(Q(type__endswith="_requested") | Q(type="vm.created"))
            .first()
        )
        if event is None:
            raise NotFound("no such request")
        caller = Caller.from_request(request)
        vm = policy.visible_vms(caller).filter(pk=event.aggregate_id).first()
        if vm is None and not caller.has("audit.view_audit_trail"):
            raise NotFound("no such request")
        request_data = EventSerializer(event).data
        body: dict[str, Any] = {
            "request": request_data,
            "state": "succeeded",
            "outcome": request_data,
        }
        if event.type != "vm.created":
            outcome = _outcome_of(event)
            body["state"] = (
                "pending"
                if outcome is None
                else ("failed" if outcome.type.endswith("_failed") else "succeeded")
            )
            body["outcome"] = None if outcome is None else EventSerializer(outcome).data
            if vm is not None and outcome is not None:
                # The VM as its outcome left it: read before the outcome committed, it would
                # still show the request in flight beside a status that says it is done.
                vm.refresh_from_db()
        body["vm"] = VMSerializer(vm).data if vm else None
        # The answer holds whole events: reading another's request is reading the trail, one
        # audit.trail_read per request. Polling the outcome of one's own request is part of
        # making it (its events already name the caller), so a client that waits on its
        # status_url does not add an event per poll.
        if not (event.actor_type == "user" and event.actor_id == str(caller.user.pk)):
            positions = {body["request"]["position"]}
            if body["outcome"] is not None:
                positions.add(body["outcome"]["position"])
            record_trail_read(
                request,
                "api.requests.retrieve",
                {"event_id": str(eid), "positions": sorted(positions)},
            )
        return Response(body)


def _outcome_of(request_event: Event) -> Event | None:
    """The outcome event of a request: the worker's (one per request, ``RequestOutcome``), or
    a guest access's (exec, file transfer: the event it caused)."""
    kind = request_event.type.removeprefix("vm.").removesuffix("_requested")
    if kind in commands.GUEST_OUTCOMES:
        return (
            Event.objects.filter(
                causation_id=str(request_event.event_id), type__in=commands.GUEST_OUTCOMES[kind]
            )
            .order_by("position")
            .first()
        )
    outcome = RequestOutcome.objects.filter(request_event_id=str(request_event.event_id)).first()
    return None if outcome is None else Event.objects.get(position=outcome.position)
