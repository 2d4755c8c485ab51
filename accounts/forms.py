"""Dashboard forms for accounts."""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm

from accounts import commands
from audit.actor import Actor


class LoginForm(AuthenticationForm):
    """Django's login form, saying plainly when an account is locked."""

    error_messages = {
        **AuthenticationForm.error_messages,
        "locked": (
            "This account is locked after repeated failed logins. Try again after %(until)s UTC."
        ),
    }

    def clean(self) -> dict[str, Any]:
        username = self.cleaned_data.get("username")
        if username and (until := commands.is_locked(username)):
            commands.record_login_failure(Actor.anonymous(username), username, "locked")
            raise self._locked(until)
        try:
            return super().clean()
        except forms.ValidationError:
            until = getattr(self.request, "_sandbox_locked_until", None)
            if until is not None:
                raise self._locked(until) from None
            raise

    def _locked(self, until: Any) -> forms.ValidationError:
        return forms.ValidationError(
            self.error_messages["locked"],
            code="locked",
            params={"until": f"{until:%Y-%m-%d %H:%M}"},
        )


class TokenForm(forms.Form):
    name = forms.CharField(max_length=100)
    # Every token issued by a user expires (accounts.commands.create_token).
    expires_days = forms.IntegerField(
        min_value=1,
        max_value=settings.SANDBOX_TOKEN_MAX_DAYS,
        initial=90,
        help_text=f"Days, at most {settings.SANDBOX_TOKEN_MAX_DAYS}",
    )
    read_only = forms.BooleanField(required=False)
