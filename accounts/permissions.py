"""DRF permissions shared by every API view."""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import SAFE_METHODS, BasePermission

from accounts.models import APIToken


class TokenWriteAllowed(BasePermission):
    """A read-only token may only read."""

    message = "This API token is read-only."

    def has_permission(self, request: Any, view: Any) -> bool:
        token = getattr(request, "auth", None)
        if isinstance(token, APIToken) and token.read_only:
            return request.method in SAFE_METHODS
        return True


class HasPerm(BasePermission):
    """``HasPerm.of("audit.view_audit_trail")``: the user must hold that permission."""

    perm = ""

    @classmethod
    def of(cls, perm: str) -> type[HasPerm]:
        return type(f"HasPerm_{perm.replace('.', '_')}", (cls,), {"perm": perm})

    def has_permission(self, request: Any, view: Any) -> bool:
        return bool(request.user and request.user.has_perm(self.perm))
