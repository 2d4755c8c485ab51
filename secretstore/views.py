"""The dashboard's secrets page: list (metadata only), create, give a new value, delete.

The value field is a password input with autocomplete off and is never filled back in: a
form with an error shows the other fields again, the value empty. Deleting asks on a page of
its own (the Content-Security-Policy allows no inline script for a confirm dialog).
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from accounts.caller import Caller
from secretstore import commands, policy
from secretstore.models import Secret

__all__ = ["delete", "secrets_page", "update"]


def _value_field() -> forms.CharField:
    return forms.CharField(
        strip=False,
        widget=forms.PasswordInput(
            attrs={"autocomplete": "off", "spellcheck": "false"}, render_value=False
        ),
        help_text="Write-only: it is never shown again, here or in the API.",
    )


class SecretForm(forms.Form):
    name = forms.CharField(max_length=128, help_text="Like an environment variable's name.")
    value = _value_field()
    group = forms.CharField(
        max_length=150, required=False, help_text="One of your groups to own it (else you)."
    )


class ValueForm(forms.Form):
    value = _value_field()
    expected_version = forms.IntegerField(widget=forms.HiddenInput, min_value=1)


def _errors_into(form: forms.Form, exc: ValidationError) -> None:
    for field, errors in exc.message_dict.items():
        form.add_error(field if field in form.fields else None, errors)


def _visible(request: HttpRequest, pk: str) -> Secret:
    try:
        return policy.visible_secrets(Caller.from_request(request)).get(pk=pk)
    except (Secret.DoesNotExist, ValidationError) as exc:
        raise Http404("no such secret") from exc


@login_required
def secrets_page(request: HttpRequest) -> HttpResponse:
    caller = Caller.from_request(request)
    visible = policy.visible_secrets(caller)
    if not caller.has("secretstore.add_secret") and not any(
        caller.has(p) for p in policy.SECRET_READ.as_list()
    ):
        raise PermissionDenied("you may not see secrets")
    form = SecretForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            secret = commands.create_secret(
                caller,
                name=form.cleaned_data["name"],
                value=form.cleaned_data["value"],
                group=form.cleaned_data["group"] or None,
            )
        except ValidationError as exc:
            _errors_into(form, exc)
        else:
            messages.success(request, f"Secret {secret.name} stored (version 1).")
            return redirect("secrets:list")
    context: dict[str, Any] = {
        "form": form,
        "may_add": caller.has("secretstore.add_secret"),
        "secrets": [(s, policy.may_act_on(caller, s)) for s in visible],
    }
    return render(request, "secretstore/list.html", context)


@login_required
def update(request: HttpRequest, pk: str) -> HttpResponse:
    caller = Caller.from_request(request)
    secret = _visible(request, pk)
    form = ValueForm(request.POST or None, initial={"expected_version": secret.version})
    if request.method == "POST" and form.is_valid():
        try:
            secret = commands.update_secret(
                caller,
                secret,
                value=form.cleaned_data["value"],
                expected_version=form.cleaned_data["expected_version"],
            )
        except ValidationError as exc:
            _errors_into(form, exc)
        except commands.Conflict as exc:
            form.add_error(None, str(exc))
        except PermissionDenied as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Secret {secret.name} is now at version {secret.version}.")
            return redirect("secrets:list")
    return render(request, "secretstore/update.html", {"form": form, "secret": secret})


@login_required
def delete(request: HttpRequest, pk: str) -> HttpResponse:
    caller = Caller.from_request(request)
    secret = _visible(request, pk)
    if request.method == "POST":
        try:
            commands.delete_secret(caller, secret)
        except PermissionDenied as exc:
            messages.error(request, f"Secret {secret.name} not deleted: {exc}")
        else:
            messages.success(request, f"Secret {secret.name} deleted.")
        return redirect("secrets:list")
    return render(request, "secretstore/delete.html", {"secret": secret})
