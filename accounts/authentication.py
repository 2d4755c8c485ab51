"""DRF authentication by API token: ``Authorization: Bearer sbx_<key>_<secret>``."""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from typing import Any

from django.utils import timezone
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed

from accounts import commands, tokens
from accounts.models import APIToken
from audit.actor import Actor
from sandbox_site import context

LAST_USED_GRANULARITY = timedelta(minutes=1)


class TokenAuthentication(BaseAuthentication):
    keywords = ("bearer", "token")

    def authenticate(self, request: Any) -> tuple[Any, APIToken] | None:
        header = get_authorization_header(request).split()
        if not header or header[0].decode(errors="replace").lower() not in self.keywords:
            return None
        if len(header) != 2:
            raise AuthenticationFailed("Invalid token header: expected 'Bearer <token>'.")
        parsed = tokens.parse(header[1].decode(errors="replace"))
        if parsed is None:
            raise AuthenticationFailed("Invalid token.")
        key, secret = parsed
        token = APIToken.objects.select_related("user").filter(key=key).first()
        if token is None:
            raise AuthenticationFailed("Invalid token.")
        if not tokens.matches(secret, token.digest, token.pepper_version):
            self._reject(token, "bad_secret")
            raise AuthenticationFailed("Invalid token.")
        if token.revoked_at is not None:
            self._reject(token, "revoked")
            raise AuthenticationFailed("Token revoked.")
        if token.is_expired:
            self._reject(token, "expired")
            raise AuthenticationFailed("Token expired.")
        if not token.user.is_active:
            self._reject(token, "user_inactive")
            raise AuthenticationFailed("User inactive.")
        ip = context.current().source_ip
        if token.allowed_ips and not self._ip_allowed(ip, token.allowed_ips):
            self._reject(token, "ip_not_allowed")
            raise AuthenticationFailed("Token not allowed from this address.")
        now = timezone.now()
        if token.last_used_at is None or now - token.last_used_at >= LAST_USED_GRANULARITY:
            # At most one write a minute per token: last_used is for humans, not accounting.
            APIToken.objects.filter(pk=token.pk).update(last_used_at=now, last_used_ip=ip or "")
        return token.user, token

    def authenticate_header(self, request: Any) -> str:
        return 'Bearer realm="api"'

    @staticmethod
    def _ip_allowed(ip: str | None, networks: list[str]) -> bool:
        if not ip:
            return False
        addr = ipaddress.ip_address(ip)
        return any(addr in ipaddress.ip_network(n, strict=False) for n in networks)

    @staticmethod
    def _reject(token: APIToken, reason: str) -> None:
        commands.record_token_rejected(Actor.anonymous(token.user.username), token, reason)
