"""Dashboard views for accounts: login, the API token page, and user and role admin."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth import password_validation, update_session_auth_hash
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from accounts import commands
from accounts.forms import LoginForm, PasswordResetForm, TokenForm
from accounts.models import APIToken, LoginState, User
from accounts.roles import ROLES
from audit.actor import Actor


class LoginView(auth_views.LoginView):
    form_class = LoginForm
    template_name = "accounts/login.html"
    redirect_authenticated_user = True


@login_required
def tokens(request: HttpRequest) -> HttpResponse:
    issued = None
    form = TokenForm(request.POST or None, user=request.user)  # type: ignore[arg-type]
    if request.method == "POST" and form.is_valid():
        try:
            issued = commands.create_token(
                Actor.from_request(request),
                request.user,  # type: ignore[arg-type]
                by=request.user,  # type: ignore[arg-type]
                name=form.cleaned_data["name"],
                expires_days=form.cleaned_data["expires_days"],
                read_only=form.cleaned_data["read_only"],
                scopes=form.cleaned_data["scopes"],
                allowed_ips=form.cleaned_data["allowed_ips"],
            )
            form = TokenForm(user=request.user)  # type: ignore[arg-type]
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
    if request.POST.get("next") == "user" and request.user.has_perm("accounts.manage_users"):
        return redirect("accounts:user", pk=token.user_id)
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
    people = list(User.objects.prefetch_related("groups").order_by("username"))
    locks = _locks([p.username for p in people])
    for p in people:
        p.locked_until = locks.get(commands.normalize_username(p.username))  # type: ignore[attr-defined]
    return render(
        request,
        "accounts/users.html",
        {"form": form, "people": people, "roles": ROLES, "section": "users"},
    )


def _locks(usernames: list[str]) -> dict[str, Any]:
    """The end of each locked username's lock (the ``accounts.login_state`` projection)."""
    names = [commands.normalize_username(u) for u in usernames]
    return dict(
        LoginState.objects.filter(username__in=names, locked_until__gt=timezone.now()).values_list(
            "username", "locked_until"
        )
    )


@login_required
def user_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """One account: its role, state, lock and recent failed logins, its tokens; the forms that
    change them (each through accounts.commands, each an event)."""
    _manager(request)
    person = get_object_or_404(User, pk=pk)
    state = LoginState.objects.filter(username=commands.normalize_username(person.username)).first()
    locked_until = (
        state.locked_until
        if state and state.locked_until and state.locked_until > timezone.now()
        else None
    )
    return render(
        request,
        "accounts/user.html",
        {
            "person": person,
            "roles": ROLES,
            "login_state": state,
            "locked_until": locked_until,
            "password_form": PasswordResetForm(),
            "person_tokens": APIToken.objects.filter(user=person).order_by("-created_at"),
            "section": "users",
        },
    )


@login_required
@require_POST
def user_unlock(request: HttpRequest, pk: int) -> HttpResponse:
    """Lift a user's login lock (``auth.unlocked``)."""
    _manager(request)
    person = get_object_or_404(User, pk=pk)
    try:
        if commands.unlock(Actor.from_request(request), person.username, by=request.user):  # type: ignore[arg-type]
            messages.success(request, f"{person.username} unlocked.")
        else:
            messages.info(request, f"{person.username} was not locked.")
    except PermissionDenied as exc:
        messages.error(request, f"{person.username} not unlocked: {_message(exc)}")
    return redirect(_back(request, person))


@login_required
@require_POST
def user_password(request: HttpRequest, pk: int) -> HttpResponse:
    """Set a new password for another user (``user.password_changed``, never the password)."""
    _manager(request)
    person = get_object_or_404(User, pk=pk)
    form = PasswordResetForm(request.POST)
    if form.is_valid():
        try:
            commands.change_password(
                Actor.from_request(request),
                person,
                form.cleaned_data["password1"],
                by=request.user,  # type: ignore[arg-type]
            )
        except (PermissionDenied, ValidationError) as exc:
            messages.error(request, f"Password of {person.username} not changed: {_message(exc)}")
        else:
            if person.pk == request.user.pk:
                # One's own new password keeps this session (the others end).
                update_session_auth_hash(request, person)
            messages.success(request, f"New password set for {person.username}.")
    else:
        problems = " ".join(str(e) for errors in form.errors.values() for e in errors)
        messages.error(request, f"Password of {person.username} not changed: {problems}")
    return redirect("accounts:user", pk=person.pk)


@login_required
@require_POST
def user_password_off(request: HttpRequest, pk: int) -> HttpResponse:
    """Turn off a user's password login (API tokens only; ``user.password_changed``)."""
    _manager(request)
    person = get_object_or_404(User, pk=pk)
    try:
        done = commands.disable_password_login(
            Actor.from_request(request),
            person,
            by=request.user,  # type: ignore[arg-type]
        )
    except PermissionDenied as exc:
        messages.error(request, f"Password login of {person.username} not changed: {exc}")
    else:
        if done:
            messages.success(request, f"{person.username} can no longer log in with a password.")
        else:
            messages.info(request, f"{person.username} had no password login.")
    return redirect("accounts:user", pk=person.pk)


def _back(request: HttpRequest, person: User) -> str:
    """Back to the page the form was on: the user's own page or the list."""
    if request.POST.get("next") == "user":
        return reverse("accounts:user", args=[person.pk])
    return reverse("accounts:users")


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
    return redirect(_back(request, person))


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
    return redirect(_back(request, person))


def _message(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return " ".join(exc.messages)
    return str(exc)
