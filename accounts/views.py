"""Dashboard views for accounts: login and the API token page."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from accounts import commands
from accounts.forms import LoginForm, TokenForm
from accounts.models import APIToken
from audit.actor import Actor


class LoginView(auth_views.LoginView):
    form_class = LoginForm
    template_name = "accounts/login.html"
    redirect_authenticated_user = True


@login_required
def tokens(request: HttpRequest) -> HttpResponse:
    issued = None
    form = TokenForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            issued = commands.create_token(
                Actor.from_request(request),
                request.user,  # type: ignore[arg-type]
                by=request.user,  # type: ignore[arg-type]
                name=form.cleaned_data["name"],
                expires_days=form.cleaned_data["expires_days"],
                read_only=form.cleaned_data["read_only"],
            )
            form = TokenForm()
        except ValidationError as exc:
            for field, errors in exc.message_dict.items():
                form.add_error(field if field in form.fields else None, errors)
    context: dict[str, Any] = {
        "form": form,
        "issued": issued,
        "tokens": APIToken.objects.filter(user=request.user),
    }
    return render(request, "accounts/tokens.html", context)


@login_required
@require_POST
def revoke_token(request: HttpRequest, pk: int) -> HttpResponse:
    token = get_object_or_404(APIToken, pk=pk)
    try:
        if commands.revoke_token(Actor.from_request(request), token, by=request.user):  # type: ignore[arg-type]
            messages.success(request, f"Token {token.name} revoked.")
    except PermissionDenied:
        messages.error(request, "You cannot revoke that token.")
    return redirect("accounts:tokens")
