"""``/api/v1/secrets/``: list and read metadata, create, give a new value, delete.

Values are write-only: no response holds one (nor its ciphertext); the metadata names the
secret, its owner, its version, when it was made and changed, and the first characters of the
HMAC of its value (as the events record it in full), so a holder of a value can check which
version it is. Who may do what: ``secretstore.policy``; every operation states its token scope.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.exceptions import APIException
from rest_framework.request import Request
from rest_framework.response import Response

from accounts.caller import Caller
from accounts.scopes import needs
from secretstore import commands, policy
from secretstore.models import Secret

__all__ = ["SecretViewSet"]

FINGERPRINT_SHOWN = 16  # hex characters of the HMAC in the metadata


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


class SecretSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner_label", read_only=True)
    hmac_prefix = serializers.SerializerMethodField()

    class Meta:
        model = Secret
        fields = [
            "id",
            "name",
            "owner",
            "version",
            "hmac_prefix",
            "key_id",
            "created_by",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields

    def get_hmac_prefix(self, obj: Secret) -> str:
        return obj.fingerprint[:FINGERPRINT_SHOWN]


class ValueField(serializers.CharField):
    """A secret's value: accepted, never shown."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("write_only", True)
        kwargs.setdefault("trim_whitespace", False)
        kwargs.setdefault("style", {"input_type": "password"})
        kwargs.setdefault(
            "help_text",
            f"the value ({commands.MIN_VALUE_BYTES} bytes or more, at most "
            "SANDBOX_SECRET_MAX_BYTES); write-only",
        )
        super().__init__(**kwargs)


class SecretCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=128, help_text="like an environment variable's name")
    value = ValueField()
    group = serializers.CharField(
        max_length=150, required=False, help_text="a group of yours to own it (default: you)"
    )


class SecretUpdateSerializer(serializers.Serializer):
    value = ValueField()
    expected_version = serializers.IntegerField(
        min_value=1, required=False, help_text="the version you saw: 409 if it moved on"
    )


class SecretViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    viewsets.GenericViewSet,
):
    """Secrets you (or your groups) own; every secret's metadata with secretstore.view_secret.
    Values go in, never come out."""

    serializer_class = SecretSerializer
    queryset = Secret.objects.none()  # for the schema; get_queryset says whose
    filterset_fields = ["name"]
    token_scopes = {
        "list": policy.SECRET_READ,
        "retrieve": policy.SECRET_READ,
        "create": needs("secretstore.add_secret"),
        "update": needs("secretstore.change_secret"),
        "partial_update": needs("secretstore.change_secret"),
        "destroy": needs("secretstore.delete_secret"),
    }

    def caller(self) -> Caller:
        return Caller.from_request(self.request)

    def get_queryset(self) -> Any:
        return policy.visible_secrets(self.caller())

    @extend_schema(request=SecretCreateSerializer, responses={201: SecretSerializer})
    def create(self, request: Request) -> Response:
        s = SecretCreateSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        secret = commands.create_secret(self.caller(), **s.validated_data)
        return Response(SecretSerializer(secret).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=SecretUpdateSerializer, responses={200: SecretSerializer})
    def update(self, request: Request, pk: Any = None) -> Response:
        secret = self.get_object()
        s = SecretUpdateSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        try:
            secret = commands.update_secret(self.caller(), secret, **s.validated_data)
        except commands.Conflict as exc:
            raise Conflict(str(exc)) from exc
        return Response(SecretSerializer(secret).data)

    @extend_schema(request=SecretUpdateSerializer, responses={200: SecretSerializer})
    def partial_update(self, request: Request, pk: Any = None) -> Response:
        return self.update(request, pk)

    @extend_schema(responses={204: None})
    def destroy(self, request: Request, pk: Any = None) -> Response:
        commands.delete_secret(self.caller(), self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)
