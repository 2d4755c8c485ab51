"""A secret: its metadata and its value, encrypted (``secretstore.crypto``).

Written only by ``secretstore.commands``, in the transaction that appends its event. Not a
projection of the log: the log never holds the value, not even encrypted (an event cannot be
re-encrypted when a key is retired), so this table is where the ciphertext lives.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.contrib.auth.models import Group
from django.db import models

__all__ = ["Secret"]


class Secret(models.Model):
    """One secret, owned by a user or by a group (exactly one of the two)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    name = models.CharField(max_length=128)
    owner_user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="secrets",
    )
    owner_group = models.ForeignKey(
        Group, null=True, blank=True, on_delete=models.PROTECT, related_name="secrets"
    )
    version = models.PositiveIntegerField(default=1)
    # The HMAC-SHA256 of the value under the audit key (secretstore.crypto.fingerprint).
    fingerprint = models.CharField(max_length=64)
    size = models.PositiveIntegerField()
    key_id = models.CharField(max_length=32, db_index=True)
    nonce = models.BinaryField(max_length=12)
    ciphertext = models.BinaryField()
    created_by = models.CharField(max_length=150, blank=True)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=(
                    models.Q(owner_user__isnull=False, owner_group__isnull=True)
                    | models.Q(owner_user__isnull=True, owner_group__isnull=False)
                ),
                name="secretstore_one_owner",
            ),
            models.UniqueConstraint(
                fields=["owner_user", "name"],
                condition=models.Q(owner_user__isnull=False),
                name="secretstore_unique_user_name",
            ),
            models.UniqueConstraint(
                fields=["owner_group", "name"],
                condition=models.Q(owner_group__isnull=False),
                name="secretstore_unique_group_name",
            ),
        ]
        permissions = [
            ("use_secret", "Can give secrets to guests"),
            ("manage_all_secrets", "Can act on every user's and group's secrets"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.owner_label})"

    @property
    def owner_label(self) -> str:
        if self.owner_group is not None:
            return f"group:{self.owner_group.name}"
        return f"user:{self.owner_user.username if self.owner_user is not None else '?'}"

    @property
    def aad(self) -> bytes:
        """What the ciphertext is bound to: this secret and this version."""
        return f"secret:{self.pk}:v{self.version}".encode()
