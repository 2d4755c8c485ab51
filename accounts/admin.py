"""Read-only admin views. Users, roles and tokens change only through accounts.commands, which
record events; the admin's own edit forms would bypass them, so they are not offered (roles,
which are Django groups, included). The admin's own password page changes the password through
``accounts.commands.change_password`` too."""

import types
from typing import Any

from django.contrib import admin
from django.contrib.admin.forms import AdminPasswordChangeForm
from django.contrib.auth import update_session_auth_hash
from django.contrib.auth.models import Group
from django.contrib.auth.views import PasswordChangeView
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse

from accounts import commands
from accounts.models import APIToken, LoginState
from audit.actor import Actor


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


class RecordedPasswordChangeView(PasswordChangeView):
    """Django's password change page, writing through ``accounts.commands.change_password``
    (its ``user.password_changed`` event) instead of saving the form itself."""

    def form_valid(self, form: Any) -> HttpResponse:
        user = form.user
        try:
            commands.change_password(
                Actor.from_request(self.request),
                user,
                form.cleaned_data["new_password1"],
                by=user,
            )
        except ValidationError as exc:
            form.add_error("new_password2", exc.messages)
            return self.form_invalid(form)
        update_session_auth_hash(self.request, user)
        return HttpResponseRedirect(self.get_success_url())


def _password_change(
    site: admin.AdminSite, request: HttpRequest, extra_context: Any = None
) -> HttpResponse:
    """``AdminSite.password_change`` with the recorded view (same form, template and pages)."""
    defaults: dict[str, Any] = {
        "form_class": AdminPasswordChangeForm,
        "success_url": reverse("admin:password_change_done", current_app=site.name),
        "extra_context": {**site.each_context(request), **(extra_context or {})},
    }
    if site.password_change_template is not None:
        defaults["template_name"] = site.password_change_template
    request.current_app = site.name
    return RecordedPasswordChangeView.as_view(**defaults)(request)


admin.site.password_change = types.MethodType(_password_change, admin.site)  # type: ignore[method-assign]
