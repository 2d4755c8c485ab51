"""Read-only admin views. Users, roles and tokens change only through accounts.commands, which
record events; the admin's own edit forms would bypass them, so they are not offered (roles,
which are Django groups, included)."""

from typing import Any

from django.contrib import admin
from django.contrib.auth.models import Group

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


# Roles are groups whose permissions come from accounts.roles (synced after every migrate) and
# whose members change only through accounts.commands: Django's editable group admin would change
# what a role may do, or who holds it, with no event.
admin.site.unregister(Group)


@admin.register(Group)
class RoleAdmin(ReadOnlyAdmin):
    list_display = ["name"]
