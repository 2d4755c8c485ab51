"""The OpenAPI schema generator of the API: drf-spectacular's, stating each operation's scope."""

from __future__ import annotations

from typing import Any

from drf_spectacular.openapi import AutoSchema

from accounts.scopes import is_write, required_scope

__all__ = ["ScopedAutoSchema"]


class ScopedAutoSchema(AutoSchema):
    """The OpenAPI schema states each operation's token scope: ``x-token-scopes`` (any one of
    them; empty: any token) and a line in its description."""

    def get_operation(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        operation = super().get_operation(*args, **kwargs)
        if operation is None:
            return None
        scope = required_scope(self.view, self.method)
        if scope is None:
            return operation
        operation["x-token-scopes"] = scope.as_list()
        line = (
            f"Token scope: {' or '.join(scope.as_list())}."
            if scope.any_of
            else "Token scope: none needed."
        )
        if is_write(self.method):
            line += " Not with a read-only token."
        text = operation.get("description", "")
        operation["description"] = f"{text}\n\n{line}" if text else line
        return operation
