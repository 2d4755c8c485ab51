"""Read-only admin views. Users, roles and tokens change only through accounts.commands, which
record events; the admin's own edit forms would bypass them, so they are not offered."""

from typing import Any

from django.contrib import admin

from accounts.models import APIToken, LoginState


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False


@admin.register(APIToken)
class APITokenAdmin(ReadOnlyAdmin):
    list_display = [
        "key",
        "name",
        "user",
        "created_at",
        "expires_at",
        "revoked_at",
        "read_only",
        "last_used_at",
    ]


@admin.register(LoginState)
class LoginStateAdmin(ReadOnlyAdmin):
    list_display = ["username", "failure_count", "locked_until", "last_login_at", "last_failure_at"]
