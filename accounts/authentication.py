"""API token authentication for HTTP (DRF) and websockets: ``Authorization: Bearer <token>``."""

from __future__ import annotations

import ipaddress
import logging
from datetime import timedelta
from importlib import import_module
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.db import DatabaseError, connection
from django.utils import timezone
from django.utils.crypto import constant_time_compare
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed, PermissionDenied

from accounts import commands, scopes, tokens
from accounts.models import APIToken
from accounts.permission_cache import prime_permissions
from audit.actor import Actor
from audit.errors import EventStoreUnavailable
from core import context

log = logging.getLogger("sandbox.accounts.auth")
LAST_USED_GRANULARITY = timedelta(minutes=1)
# Websocket close codes, as the consumers use them.
CLOSE_UNAUTHENTICATED, CLOSE_FORBIDDEN = 4401, 4403


class _TokenQuery:
    """The token, its user and the user's groups in one query: every API request runs it.

    The ORM would take three (token with user, then groups for the permission check), and
    compiling them costs more CPU than PostgreSQL spends answering; this SQL is built once from
    the models' metadata, so it follows their fields.
    """

    def __init__(self) -> None:
        user_model = get_user_model()
        # Model metadata is typed loosely by the stubs (optional names, relation unions); every
        # attribute read here exists on these concrete models.
        token_meta: Any = APIToken._meta
        user_meta: Any = user_model._meta
        self.token_fields = [f.attname for f in token_meta.concrete_fields]
        self.user_fields = [f.attname for f in user_meta.concrete_fields]
        through: Any = user_meta.get_field("groups").remote_field.through._meta
        qn = connection.ops.quote_name
        columns = [f"t.{qn(f.column)}" for f in token_meta.concrete_fields]
        columns += [f"u.{qn(f.column)}" for f in user_meta.concrete_fields]
        user_fk = through.get_field(user_meta.model_name).column
        group_fk = through.get_field("group").column
        columns.append(f"g.{qn(group_fk)}")
        user_pk = qn(user_meta.pk.column)
        # Identifiers only, from model metadata and quoted; the key is a bound parameter.
        self.sql = (
            f"SELECT {', '.join(columns)} FROM {qn(token_meta.db_table)} t"  # noqa: S608
            f" JOIN {qn(user_meta.db_table)} u"
            f" ON u.{user_pk} = t.{qn(token_meta.get_field('user').column)}"
            f" LEFT JOIN {qn(through.db_table)} g ON g.{qn(user_fk)} = u.{user_pk}"
            f" WHERE t.{qn(token_meta.get_field('key').column)} = %s"
        )
        self.user_model = user_model
        self.converters: list[tuple[list[Any], Any]] | None = None

    def __call__(self, key: str) -> APIToken | None:
        with connection.cursor() as cursor:
            cursor.execute(self.sql, [key])
            rows = cursor.fetchall()
        if not rows:
            return None
        if self.converters is None:
            self.converters = _converters(APIToken) + _converters(self.user_model)
        values = [
            _apply(convs, col, value)
            for (convs, col), value in zip(self.converters, rows[0], strict=False)
        ]
        n_token = len(self.token_fields)
        token = APIToken.from_db(connection.alias, self.token_fields, values[:n_token])
        user = self.user_model.from_db(connection.alias, self.user_fields, values[n_token:])
        token.user = user
        prime_permissions(user, [row[-1] for row in rows if row[-1] is not None])
        return token


def _converters(model: Any) -> list[tuple[list[Any], Any]]:
    """Per column, the converters the ORM's compiler applies (JSON, SQLite's types), in order."""
    out = []
    for field in model._meta.concrete_fields:
        col = field.get_col(model._meta.db_table)
        out.append((connection.ops.get_db_converters(col) + col.get_db_converters(connection), col))
    return out


def _apply(converters: list[Any], col: Any, value: Any) -> Any:
    for converter in converters:
        value = converter(value, col, connection)
    return value


_token_query: _TokenQuery | None = None


def lookup(key: str) -> APIToken | None:
    """The token with this public key, its user loaded and the user's permissions primed."""
    global _token_query
    if _token_query is None:
        _token_query = _TokenQuery()
    return _token_query(key)


def verify(raw: str, ip: str | None) -> APIToken:
    """The live token that ``raw`` (``sbx_<key>_<secret>``) names, used from ``ip``.

    Refuses (AuthenticationFailed, recorded as ``auth.token_rejected``) a wrong secret, a revoked
    or expired token, an inactive user and an address outside the token's networks. HTTP and
    websocket authentication both come here.
    """
    parsed = tokens.parse(raw)
    if parsed is None:
        raise AuthenticationFailed("Invalid token.")
    key, secret = parsed
    token = lookup(key)
    if token is None:
        raise AuthenticationFailed("Invalid token.")
    if not tokens.matches(secret, token.digest, token.pepper_version):
        _reject(
            token, "pepper_retired" if tokens.pepper_retired(token.pepper_version) else "bad_secret"
        )
        raise AuthenticationFailed("Invalid token.")
    if token.revoked_at is not None:
        _reject(token, "revoked")
        raise AuthenticationFailed("Token revoked.")
    if token.is_expired:
        _reject(token, "expired")
        raise AuthenticationFailed("Token expired.")
    if not token.user.is_active:
        _reject(token, "user_inactive")
        raise AuthenticationFailed("User inactive.")
    if token.allowed_ips and not ip_allowed(ip, token.allowed_ips):
        _reject(token, "ip_not_allowed")
        raise AuthenticationFailed("Token not allowed from this address.")
    if token.pepper_version != settings.SANDBOX_TOKEN_PEPPER_CURRENT:
        _rehash(token, secret)
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_GRANULARITY:
        # At most one write a minute per token: last_used is for humans, not accounting.
        APIToken.objects.filter(pk=token.pk).update(last_used_at=now, last_used_ip=ip or "")
    return token


def ip_allowed(ip: str | None, networks: list[str]) -> bool:
    if not ip:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        # ::ffff:1.2.3.4 (an IPv4 client on a dual-stack socket) is 1.2.3.4.
        addr = addr.ipv4_mapped
    return any(addr in ipaddress.ip_network(n, strict=False) for n in networks)


def _rehash(token: APIToken, secret: str) -> None:
    """Move the token to the current pepper; a failure leaves it on the old one (still valid,
    tried again at its next use) rather than refusing a good token."""
    try:
        commands.rehash_token(token, secret)
    except (EventStoreUnavailable, DatabaseError):
        log.warning("token not re-hashed with the current pepper", extra={"token_id": token.key})


def _reject(token: APIToken, reason: str) -> None:
    commands.record_token_rejected(Actor.anonymous(token.user.username), token, reason)


class TokenAuthentication(BaseAuthentication):
    """``Authorization: Bearer <token>``, and the token's own limits on what it may call.

    After the token is found live (``verify``), its read-only flag and scopes are applied to the
    operation being called (``accounts.scopes``): here rather than in a permission class,
    because a view may replace its ``permission_classes``, while a view that drops this class
    cannot be reached with a token at all.
    """

    keywords = ("bearer", "token")

    def authenticate(self, request: Any) -> tuple[Any, APIToken] | None:
        header = get_authorization_header(request).split()
        if not header or header[0].decode(errors="replace").lower() not in self.keywords:
            return None
        if len(header) != 2:
            raise AuthenticationFailed("Invalid token header: expected 'Bearer <token>'.")
        token = verify(header[1].decode(errors="replace"), context.current().source_ip)
        view = (getattr(request, "parser_context", None) or {}).get("view")
        scope = scopes.required_scope(view, request.method) if view is not None else None
        refused = scopes.refusal(token, scope, write=scopes.is_write(request.method))
        if refused is not None:
            _reject(token, refused.reason)
            raise PermissionDenied(refused.detail)
        return token.user, token

    def authenticate_header(self, request: Any) -> str:
        return 'Bearer realm="api"'


async def socket_refused(scope: Any, needed: scopes.Needs, *, write: bool) -> bool:
    """For a websocket consumer, before it accepts: whether the connection's token may not do
    this (then recorded as ``auth.token_rejected``, as over HTTP). No token: False."""
    refused = scopes.check_socket(scope, needed, write=write)
    if refused is None:
        return False
    await database_sync_to_async(_reject)(scope["auth"], refused.reason)
    return True


def recheck_socket(scope: Any) -> int | None:
    """For an open websocket: whether its caller may still act, read afresh from the database.

    A socket is authenticated once, at the handshake; tokens are revoked or expire, users are
    deactivated, demoted or log out afterwards. Consumers call this before each command or
    keystroke batch and whenever access changes (``vms.live.ACCESS_GROUP``), and close the
    socket with the code returned (4401) when the caller is gone. Otherwise it returns None and
    leaves the fresh user (its role now) and token in the scope, for the consumer to re-apply
    what the caller may see and do. A dead token is recorded as ``auth.token_rejected``."""
    user = scope.get("user")
    if user is None or not user.is_authenticated:
        return CLOSE_UNAUTHENTICATED
    token = scope.get("auth")
    if isinstance(token, APIToken):
        fresh_token = lookup(token.key)
        reason = None
        if fresh_token is None or fresh_token.revoked_at is not None:
            reason = "revoked"
        elif fresh_token.is_expired:
            reason = "expired"
        elif not fresh_token.user.is_active:
            reason = "user_inactive"
        if reason is not None:
            _reject(fresh_token or token, reason)
            return CLOSE_UNAUTHENTICATED
        assert fresh_token is not None
        scope["auth"], scope["user"] = fresh_token, fresh_token.user
        return None
    fresh = get_user_model().objects.filter(pk=user.pk, is_active=True).first()
    if fresh is None:
        return CLOSE_UNAUTHENTICATED
    session = scope.get("session")
    key = getattr(session, "session_key", None) if session is not None else None
    if session is not None and key:
        # A browser's socket: its session must still exist (no logout), still be this user's,
        # and still carry the password hash it was made with (a password change ends it).
        data = import_module(settings.SESSION_ENGINE).SessionStore(key).load()
        session_hash = data.get(HASH_SESSION_KEY) or ""
        # The hash under SECRET_KEY, or under a fallback (a session from before the Django
        # secret was rotated, valid until that secret is retired), as Django's get_user has it.
        hashes = [fresh.get_session_auth_hash(), *fresh.get_session_auth_fallback_hash()]
        if str(data.get(SESSION_KEY)) != str(fresh.pk) or not any(
            constant_time_compare(session_hash, h) for h in hashes
        ):
            return CLOSE_UNAUTHENTICATED
    scope["user"] = fresh
    return None


class TokenAuthMiddleware:
    """Channels middleware: a websocket handshake with ``Authorization: Bearer <token>`` is
    authenticated as the API does (``verify``); ``scope["auth"]`` is the token.

    A consumer must apply the token's limits (``socket_refused``) before it accepts;
    one that accepts a token's connection without that check is answered with a close (4403)
    instead, so a new consumer cannot forget it.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        header = dict(scope.get("headers") or []).get(b"authorization")
        if scope.get("type") != "websocket" or header is None:
            return await self.inner(scope, receive, send)
        parts = header.decode(errors="replace").split()
        client = scope.get("client") or (None, None)
        try:
            if len(parts) != 2 or parts[0].lower() not in TokenAuthentication.keywords:
                raise AuthenticationFailed("Invalid token header: expected 'Bearer <token>'.")
            token = await database_sync_to_async(verify)(parts[1], client[0])
        except AuthenticationFailed:
            message = await receive()
            if message.get("type") == "websocket.connect":
                await send({"type": "websocket.close", "code": CLOSE_UNAUTHENTICATED})
            return None
        checked: list[bool] = []
        scope = dict(scope, user=token.user, auth=token, token_checked=checked)

        async def guarded_send(message: dict[str, Any]) -> None:
            if message.get("type") == "websocket.accept" and not checked:
                message = {"type": "websocket.close", "code": CLOSE_FORBIDDEN}
            await send(message)

        return await self.inner(scope, receive, guarded_send)
