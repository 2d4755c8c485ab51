"""Dashboard views for accounts: login, the API token page, and user and role admin."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth import password_validation
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from accounts import commands
from accounts.forms import LoginForm, TokenForm
from accounts.models import APIToken, User
from accounts.roles import ROLES
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


# --- Users and roles (admins) -------------------------------------------------------------------


class UserCreateForm(forms.Form):
    """A new account (kept here, beside its only view)."""

    username = forms.CharField(max_length=150)
    email = forms.EmailField(required=False)
    role = forms.ChoiceField(choices=[(r, r) for r in ("operator", "viewer", "auditor", "admin")])
    password = forms.CharField(
        widget=forms.PasswordInput, required=False, help_text="empty: no password login"
    )

    def clean_password(self) -> str:
        password = self.cleaned_data.get("password") or ""
        if password:
            password_validation.validate_password(password)
        return password


def _manager(request: HttpRequest) -> None:
    if not request.user.has_perm("accounts.manage_users"):
        raise PermissionDenied("you need the accounts.manage_users permission")


@login_required
def users(request: HttpRequest) -> HttpResponse:
    """Every account with its role; create one. Changes go through accounts.commands."""
    _manager(request)
    form = UserCreateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            user = commands.create_user(
                Actor.from_request(request),
                username=form.cleaned_data["username"],
                password=form.cleaned_data["password"],
                role=form.cleaned_data["role"],
                email=form.cleaned_data["email"],
                by=request.user,  # type: ignore[arg-type]
            )
        except ValidationError as exc:
            for field, errors in exc.message_dict.items():
                form.add_error(field if field in form.fields else None, errors)
        else:
            messages.success(
                request, f"User {user.username} created ({form.cleaned_data['role']})."
            )
            return redirect("accounts:users")
    people = User.objects.prefetch_related("groups").order_by("username")
    return render(
        request,
        "accounts/users.html",
        {"form": form, "people": people, "roles": ROLES, "section": "users"},
    )


@login_required
@require_POST
def user_role(request: HttpRequest, pk: int) -> HttpResponse:
    _manager(request)
    person = get_object_or_404(User, pk=pk)
    try:
        person = commands.set_role(
            Actor.from_request(request),
            person,
            request.POST.get("role", ""),
            by=request.user,  # type: ignore[arg-type]
        )
        messages.success(request, f"{person.username} is now {person.role}.")
    except (PermissionDenied, ValidationError, commands.Conflict) as exc:
        messages.error(request, f"Role of {person.username} not changed: {_message(exc)}")
    return redirect("accounts:users")


@login_required
@require_POST
def user_active(request: HttpRequest, pk: int) -> HttpResponse:
    _manager(request)
    person = get_object_or_404(User, pk=pk)
    active = request.POST.get("active") == "1"
    try:
        commands.set_active(Actor.from_request(request), person, active, by=request.user)  # type: ignore[arg-type]
        messages.success(
            request, f"{person.username} {'reactivated' if active else 'deactivated'}."
        )
    except (PermissionDenied, ValidationError, commands.Conflict) as exc:
        messages.error(request, f"{person.username} not changed: {_message(exc)}")
    return redirect("accounts:users")


def _message(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return " ".join(exc.messages)
    return str(exc)
