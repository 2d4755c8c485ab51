"""Dashboard forms for accounts."""

from __future__ import annotations

import re
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm

from accounts import throttle
from accounts.models import User
from accounts.scopes import SCOPES, SELF_SERVICE
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
    """A new API token with the limits the API offers (docs/accounts.md, "What a token may
    do"): expiry, read-only, scopes among the permissions the user holds, allowed networks.
    ``accounts.commands.create_token`` checks them all again."""

    name = forms.CharField(max_length=100)
    # Every token issued by a user expires (accounts.commands.create_token).
    expires_days = forms.IntegerField(
        label="Expires after (days)",
        min_value=1,
        max_value=settings.SANDBOX_TOKEN_MAX_DAYS,
        initial=90,
        help_text=f"1 to {settings.SANDBOX_TOKEN_MAX_DAYS} days",
    )
    read_only = forms.BooleanField(
        required=False, help_text="only GET, HEAD and OPTIONS; a console opens for watching"
    )
    scopes = forms.MultipleChoiceField(
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="none ticked: everything your role allows",
    )
    allowed_ips = forms.CharField(
        label="Allowed addresses",
        required=False,
        max_length=2000,
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "10.0.0.0/8, 192.0.2.7"}),
        help_text="addresses or networks, separated by commas or lines; empty: anywhere",
    )

    def __init__(self, *args: Any, user: User | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        held = [s for s in SCOPES if s in SELF_SERVICE or (user is not None and user.has_perm(s))]
        self.fields["scopes"].choices = [(s, s) for s in held]  # type: ignore[attr-defined]

    def clean_allowed_ips(self) -> list[str]:
        # The networks are checked (and normalised) by accounts.commands.create_token.
        text = self.cleaned_data.get("allowed_ips") or ""
        return [item for item in re.split(r"[\s,]+", text) if item]


class PasswordResetForm(forms.Form):
    """A new password an admin sets for another user (``accounts.commands.change_password``
    applies Django's password validators)."""

    password1 = forms.CharField(
        label="New password",
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
    )
    password2 = forms.CharField(
        label="Repeat it",
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("password1") and data.get("password1") != data.get("password2"):
            raise forms.ValidationError("the two passwords differ")
        return data
