"""Dashboard forms for accounts."""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm

from accounts import throttle
from audit.actor import Actor


class LoginForm(AuthenticationForm):
    """Django's login form, saying plainly when a username is locked: for names that do not
    exist exactly as for real ones (``accounts.backends.LockoutModelBackend``)."""

    error_messages = {
        **AuthenticationForm.error_messages,
        "locked": (
            "This account is locked after repeated failed logins. Try again after %(until)s UTC."
        ),
        "throttled": "Too many failed logins from your address. Try again after %(until)s UTC.",
    }

    def clean(self) -> dict[str, Any]:
        # An address over its failure limit is refused first: no lookup, no hashing, no event
        # (its auth.login_throttled event covers every refused attempt).
        if until := throttle.refused_until(Actor.anonymous().source_ip):
            raise self._refused("throttled", until)
        # A locked username is refused by the authentication backend, with one password hash as
        # for a wrong password, and said so here whether the name exists or not.
        try:
            return super().clean()
        except forms.ValidationError:
            until = getattr(self.request, "_sandbox_throttled_until", None)
            if until is not None:
                raise self._refused("throttled", until) from None
            until = getattr(self.request, "_sandbox_locked_until", None)
            if until is not None:
                raise self._refused("locked", until) from None
            raise

    def _refused(self, code: str, until: Any) -> forms.ValidationError:
        return forms.ValidationError(
            self.error_messages[code],
            code=code,
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
