"""REST API for the current user, users (admins) and API tokens."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import APIException, PermissionDenied, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts import commands, roles
from accounts.caller import Caller
from accounts.models import APIToken, User
from accounts.scopes import OPEN, SCOPES, TOKEN_READ, USER_READ, needs
from audit.actor import Actor
from core.permissions import HasPerm


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


def django_errors(exc: Exception) -> Exception:
    """Map a command's exception onto DRF's (400 with field errors, 403, 409)."""
    if isinstance(exc, commands.Conflict):
        return Conflict(str(exc))
    if isinstance(exc, DjangoValidationError):
        return ValidationError(exc.message_dict if hasattr(exc, "error_dict") else exc.messages)
    if isinstance(exc, DjangoPermissionDenied):
        return PermissionDenied(str(exc))
    return exc


class OptionalEmailField(serializers.EmailField):
    """An email address, or null for an account without one: an empty string is no email
    address, and would break the schema's ``format: email``."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("allow_null", True)
        super().__init__(**kwargs)

    def to_representation(self, value: Any) -> str | None:
        return value or None


class UserSerializer(serializers.ModelSerializer):
    role = serializers.CharField(read_only=True)
    email = OptionalEmailField(read_only=True)

    class Meta:
        model = User
        fields = ["id", "username", "email", "role", "is_active", "last_login", "date_joined"]
        read_only_fields = fields


class UserCreateSerializer(serializers.Serializer):
    """A new account. ``password`` is required; null makes an account without password login
    (API tokens only). Django's password validators apply (in ``accounts.commands``)."""

    username = serializers.CharField(max_length=150)
    email = OptionalEmailField(required=False, allow_blank=True, default=None)
    password = serializers.CharField(write_only=True, min_length=8, allow_null=True)
    role = serializers.ChoiceField(choices=roles.ROLES)


class RoleSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=roles.ROLES)


class MeSerializer(UserSerializer):
    """You, and what the credential of this request may do: a client (the MCP server, a UI)
    needs the token's own limits beside the user's permissions to know what it may offer."""

    permissions = serializers.ListField(child=serializers.CharField(), read_only=True)
    token = serializers.CharField(
        allow_null=True,
        read_only=True,
        help_text="the public key of the API token used; null: a session",
    )
    token_read_only = serializers.BooleanField(
        allow_null=True, read_only=True, help_text="whether that token may only read"
    )
    token_scopes = serializers.ListField(
        child=serializers.CharField(),
        allow_null=True,
        read_only=True,
        help_text="that token's scopes (empty: all of the user's permissions)",
    )

    class Meta(UserSerializer.Meta):
        fields = [
            *UserSerializer.Meta.fields,
            "permissions",
            "token",
            "token_read_only",
            "token_scopes",
        ]
        read_only_fields = fields


class MeView(APIView):
    token_scopes = {"get": OPEN}

    @extend_schema(responses=MeSerializer)
    def get(self, request: Request) -> Response:
        data = UserSerializer(request.user).data
        data["permissions"] = sorted(request.user.get_all_permissions())
        token = request.auth if isinstance(request.auth, APIToken) else None
        data["token"] = None if token is None else token.key
        data["token_read_only"] = None if token is None else token.read_only
        data["token_scopes"] = None if token is None else sorted(token.scopes)
        return Response(data)


class UserViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Users and their roles (admins)."""

    queryset = User.objects.order_by("username").prefetch_related("groups")
    serializer_class = UserSerializer
    permission_classes = [HasPerm.of("accounts.manage_users")]
    token_scopes = {
        "list": USER_READ,
        "retrieve": USER_READ,
        "create": needs("accounts.manage_users"),
        "role": needs("accounts.manage_users"),
        "unlock": needs("accounts.manage_users"),
    }
    filterset_fields = ["is_active", "username"]

    @extend_schema(request=UserCreateSerializer, responses={201: UserSerializer})
    def create(self, request: Request) -> Response:
        s = UserCreateSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        try:
            user = commands.create_user(
                Actor.from_request(request),
                by=request.user,
                token=Caller.from_request(request).token,
                **s.validated_data,
            )
        except (DjangoValidationError, DjangoPermissionDenied) as exc:
            raise django_errors(exc) from exc
        return Response(UserSerializer(user).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        request=RoleSerializer,
        responses={
            200: UserSerializer,
            409: inline_serializer("LastAdmin", {"detail": serializers.CharField()}),
        },
    )
    @action(detail=True, methods=["post"])
    def role(self, request: Request, pk: Any = None) -> Response:
        user = self.get_object()
        s = RoleSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        try:
            # The answer shows the user as stored after the change, not the prefetched copy.
            user = commands.set_role(
                Actor.from_request(request),
                user,
                s.validated_data["role"],
                by=request.user,
                token=Caller.from_request(request).token,
            )
        except (DjangoValidationError, DjangoPermissionDenied, commands.Conflict) as exc:
            raise django_errors(exc) from exc
        return Response(UserSerializer(user).data)

    @extend_schema(
        request=None,
        responses={
            200: inline_serializer(
                "Unlocked",
                {"username": serializers.CharField(), "unlocked": serializers.BooleanField()},
            ),
            409: inline_serializer("NotLocked", {"detail": serializers.CharField()}),
        },
    )
    @action(detail=True, methods=["post"])
    def unlock(self, request: Request, pk: Any = None) -> Response:
        """Lift the user's lockout after repeated failed logins (an ``auth.unlocked`` event)."""
        user = self.get_object()
        try:
            done = commands.unlock(Actor.from_request(request), user.username, by=request.user)
        except DjangoPermissionDenied as exc:
            raise django_errors(exc) from exc
        if not done:
            return Response(
                {"detail": f"{user.username} is not locked"},
                status=status.HTTP_409_CONFLICT,
            )
        return Response({"username": user.username, "unlocked": True})


class TokenSerializer(serializers.ModelSerializer):
    username = serializers.CharField(source="user.username", read_only=True)
    is_active = serializers.BooleanField(read_only=True)

    class Meta:
        model = APIToken
        fields = [
            "id",
            "key",
            "name",
            "username",
            "created_at",
            "expires_at",
            "revoked_at",
            "read_only",
            "allowed_ips",
            "scopes",
            "last_used_at",
            "last_used_ip",
            "is_active",
        ]
        read_only_fields = fields


class TokenCreateSerializer(serializers.Serializer):
    """A new token: it never exceeds the user, nor the token the request comes with."""

    name = serializers.CharField(max_length=100)
    expires_days = serializers.IntegerField(
        min_value=1,
        max_value=settings.SANDBOX_TOKEN_MAX_DAYS,
        required=False,
        help_text=(
            f"days until it expires; default {commands.DEFAULT_EXPIRY_DAYS}, at most "
            f"{settings.SANDBOX_TOKEN_MAX_DAYS}. Every token issued through the API expires "
            "(null is refused). Issued with a token: no later than that token; left out, it is "
            "cut to that token's expiry."
        ),
    )
    read_only = serializers.BooleanField(default=False, help_text="the token may only read")
    scopes = serializers.ListField(
        child=serializers.ChoiceField(choices=list(SCOPES)),
        required=False,
        default=list,
        help_text=(
            "permissions the token is limited to (empty: all of the user's). Issued with a "
            "scoped token: a subset of its scopes; empty inherits them."
        ),
    )
    allowed_ips = serializers.ListField(
        child=serializers.CharField(max_length=64),
        required=False,
        default=list,
        help_text=(
            "addresses or networks the token may be used from (empty: any). Issued with an "
            "IP-restricted token: inside its networks; empty inherits them."
        ),
    )


class TokenViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Your API tokens. The secret is in the creation response only; DELETE revokes."""

    serializer_class = TokenSerializer
    filterset_fields = ["read_only"]
    token_scopes = {
        "list": TOKEN_READ,
        "retrieve": TOKEN_READ,
        "create": needs("accounts.add_apitoken"),
        "destroy": needs("accounts.delete_apitoken"),
    }

    queryset = APIToken.objects.none()  # for the schema; get_queryset says whose

    def get_queryset(self) -> Any:
        qs = APIToken.objects.select_related("user")
        # Everyone's tokens only if the caller (and the token it uses) holds manage_all_tokens.
        if Caller.from_request(self.request).has("accounts.manage_all_tokens"):
            return qs
        return qs.filter(user=self.request.user)

    @extend_schema(
        request=TokenCreateSerializer,
        responses={
            201: inline_serializer(
                "TokenCreated",
                {"token": serializers.CharField(), "detail": TokenSerializer()},
            )
        },
    )
    def create(self, request: Request) -> Response:
        s = TokenCreateSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        try:
            issued = commands.create_token(
                Actor.from_request(request),
                request.user,
                by=request.user,
                parent=Caller.from_request(request).token,
                **s.validated_data,
            )
        except (DjangoValidationError, DjangoPermissionDenied) as exc:
            raise django_errors(exc) from exc
        return Response(
            {"token": issued.plaintext, "detail": TokenSerializer(issued.token).data},
            status=status.HTTP_201_CREATED,
        )

    def perform_destroy(self, instance: APIToken) -> None:
        if instance.user_id != self.request.user.pk:
            # Another user's token: the token used must hold manage_all_tokens too.
            try:
                Caller.from_request(self.request).require("accounts.manage_all_tokens")
            except DjangoPermissionDenied as exc:
                raise django_errors(exc) from exc
        try:
            commands.revoke_token(Actor.from_request(self.request), instance, by=self.request.user)
        except DjangoPermissionDenied as exc:
            raise django_errors(exc) from exc
