"""Users, API tokens and the login-security read model."""

from __future__ import annotations

from typing import Any, ClassVar

from django.contrib.auth.models import AbstractUser, UserManager
from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone

from accounts.roles import role_of

__all__ = ["APIToken", "LoginState", "SandboxUserManager", "User"]


class SandboxUserManager(UserManager["User"]):
    """Django's manager, minus the superuser shortcut: an admin is made with its role, its event
    and its superuser flag together, by ``manage.py create_sandbox_user NAME --role admin``."""

    def create_superuser(self, *args: Any, **kwargs: Any) -> Any:
        raise ValidationError(
            "superusers are admins: use `manage.py create_sandbox_user NAME --role admin`"
        )


class User(AbstractUser):
    """A person or a service account. The role is the user's single role group; the superuser
    and staff flags follow the admin role and are written with it (``accounts.commands``)."""

    objects: ClassVar[SandboxUserManager] = SandboxUserManager()  # type: ignore[assignment]

    class Meta(AbstractUser.Meta):
        swappable = "AUTH_USER_MODEL"
        permissions = [
            ("manage_users", "Can create users and change roles"),
            ("manage_all_tokens", "Can see and revoke any user's API tokens"),
        ]

    @property
    def role(self) -> str:
        return role_of(self)


class APIToken(models.Model):
    """An API token: a public key id plus an HMAC digest of the secret, never the secret.

    The full token is ``sbx_<key>_<secret>``, shown once at creation.
    """

    key = models.CharField(max_length=16, unique=True)
    digest = models.CharField(max_length=64)
    pepper_version = models.PositiveSmallIntegerField()
    user = models.ForeignKey("accounts.User", on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    read_only = models.BooleanField(default=False)
    allowed_ips = models.JSONField(default=list, blank=True)
    # Permission names ("vms.exec_vm", ...) this token is limited to; empty: all of the user's.
    scopes = models.JSONField(default=list, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    last_used_ip = models.CharField(max_length=45, blank=True)
    # The token whose request issued this one (None: a session or the shell). Revoking a token
    # revokes every token it issued, and theirs (accounts.commands.revoke_token).
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="children"
    )

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.key})"

    @property
    def is_expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= timezone.now()

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None and not self.is_expired


class LoginState(models.Model):
    """Projection of auth events per username: recent failures and the lock, if any.

    Failure times are event times, not wall-clock reads, so a rebuild gives the same rows.
    """

    username = models.CharField(max_length=150, primary_key=True)
    recent_failures = models.JSONField(default=list)  # ISO times, newest last, bounded
    failure_count = models.PositiveIntegerField(default=0)
    locked_until = models.DateTimeField(null=True, blank=True)
    last_login_at = models.DateTimeField(null=True, blank=True)
    last_failure_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return self.username
