"""DRF permission classes that only ask Django's permission system about the request's user.

(A token's own limits, its read-only flag and scopes, are applied by the accounts app before any
of these run: ``accounts.scopes``.)
"""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission

__all__ = ["HasPerm"]


class HasPerm(BasePermission):
    """``HasPerm.of("audit.view_audit_trail")``: the user must hold that permission."""

    perm = ""

    @classmethod
    def of(cls, perm: str) -> type[HasPerm]:
        return type(f"HasPerm_{perm.replace('.', '_')}", (cls,), {"perm": perm})

    def has_permission(self, request: Any, view: Any) -> bool:
        return bool(request.user and request.user.has_perm(self.perm))
