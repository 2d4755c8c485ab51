"""Webhook subscriptions, their deliveries and each delivery's attempts, and the dispatch cursor.

Subscriptions are written only by ``webhooks.commands``, in the transaction that appends their
event (``webhook.subscribed``, ``webhook.updated``...). Their signing secret is sealed with the
secrets store's keys (``secretstore.crypto``): the table holds ciphertext, no event holds it.

Deliveries and attempts are not events: recording each attempt in the log would feed the log
back into itself (an attempt's event would be delivered, and so on). They are an operational
record for the dashboard and the API, pruned by age (``SANDBOX_WEBHOOK_RETENTION_DAYS``).
"""

from __future__ import annotations

import uuid
from fnmatch import fnmatchcase

from django.conf import settings
from django.db import models

from webhooks import targets

__all__ = ["Delivery", "DeliveryAttempt", "DispatchState", "Subscription"]


class Subscription(models.Model):
    """A URL that receives the events of some types (globs), maybe only of some VMs or owners.

    Delivered as its owner: an event goes out only if the owner may read it at delivery time
    (``webhooks.policy.may_read``), narrowed by the scopes of the API token that created it.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="webhook_subscriptions"
    )
    url = models.CharField(max_length=2048)
    description = models.CharField(max_length=200, blank=True)
    event_types = models.JSONField(default=list)  # globs: "vm.*", "snapshot.created", "*"
    vm_ids = models.JSONField(default=list, blank=True)  # only events of these VMs (empty: any)
    owners = models.JSONField(default=list, blank=True)  # only events of these users' VMs
    # The scopes of the API token that made it (empty: its owner's permissions, unnarrowed).
    scopes = models.JSONField(default=list, blank=True)
    active = models.BooleanField(default=True)
    # Loopback and private targets allowed (administrators only: webhooks.allow_private_targets).
    allow_private = models.BooleanField(default=False)
    # Only events after this position are delivered: its subscription, or its re-enabling.
    start_position = models.BigIntegerField(default=0)
    # The signing secret, sealed (secretstore.crypto); the previous one signs too until
    # previous_until (a rotation's grace period).
    secret_version = models.PositiveIntegerField(default=1)
    secret_key_id = models.CharField(max_length=32)
    secret_nonce = models.BinaryField(max_length=12)
    secret_ciphertext = models.BinaryField()
    previous_key_id = models.CharField(max_length=32, blank=True)
    previous_nonce = models.BinaryField(max_length=12, null=True, blank=True)
    previous_ciphertext = models.BinaryField(null=True, blank=True)
    previous_until = models.DateTimeField(null=True, blank=True)
    # Deliveries that ran out of attempts in a row (a success resets it).
    consecutive_failures = models.PositiveIntegerField(default=0)
    disabled_reason = models.CharField(max_length=32, blank=True)
    disabled_at = models.DateTimeField(null=True, blank=True)
    last_success_at = models.DateTimeField(null=True, blank=True)
    last_failure_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["active"], name="webhooks_sub_active_idx")]
        permissions = [
            ("manage_all_subscriptions", "Can act on every user's webhook subscriptions"),
            (
                "allow_private_targets",
                "Can let a webhook deliver to loopback or private addresses",
            ),
        ]

    def __str__(self) -> str:
        return f"webhook {self.pk} ({self.description or self.url[:40]})"

    @property
    def target(self) -> str:
        """The URL's origin (scheme, host, port): what others than its owner are shown."""
        try:
            return targets.parse(self.url).origin
        except targets.TargetRefused:
            return ""

    def matches_type(self, event_type: str) -> bool:
        return any(fnmatchcase(event_type, pattern) for pattern in self.event_types)

    def sealed_aad(self, version: int) -> bytes:
        """What a sealed secret is bound to: this subscription and that secret version."""
        return f"webhook:{self.pk}:secret:v{version}".encode()


class Delivery(models.Model):
    """One event to one subscription: made by the dispatcher, sent (and retried) by the pump.

    The id is the ``Sandbox-Delivery-Id`` header: the same on every attempt of this delivery.
    """

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"  # not sent yet, or waiting for its next attempt
        DELIVERED = "delivered", "Delivered"
        FAILED = "failed", "Failed"  # out of attempts
        SKIPPED = "skipped", "Skipped"  # its owner may no longer read the event
        CANCELLED = "cancelled", "Cancelled"  # the subscription was disabled first

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    subscription = models.ForeignKey(
        Subscription, on_delete=models.CASCADE, related_name="deliveries"
    )
    event_position = models.BigIntegerField()
    event_id = models.UUIDField()
    event_type = models.CharField(max_length=64)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)  # counted when an attempt is claimed
    # When a pending delivery is next due; while an attempt runs, when its claim lapses.
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-event_position"]
        constraints = [
            models.UniqueConstraint(
                fields=["subscription", "event_position"], name="webhooks_delivery_once"
            )
        ]
        indexes = [
            models.Index(fields=["status", "next_attempt_at"], name="webhooks_delivery_due_idx"),
            models.Index(fields=["finished_at"], name="webhooks_delivery_done_idx"),
        ]

    def __str__(self) -> str:
        return f"delivery {self.pk} of #{self.event_position} ({self.status})"


class DeliveryAttempt(models.Model):
    """One HTTP attempt of a delivery: what the receiver answered, or what went wrong."""

    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="tries")
    number = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    duration_ms = models.PositiveIntegerField(default=0)
    address = models.CharField(max_length=45, blank=True)  # the checked address connected to
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.CharField(max_length=200, blank=True)
    response_excerpt = models.TextField(blank=True)  # the body's first bytes, as text
    next_retry_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["number"]
        constraints = [
            models.UniqueConstraint(fields=["delivery", "number"], name="webhooks_attempt_once")
        ]

    def __str__(self) -> str:
        return f"attempt {self.number} of {self.delivery_id}: {self.status_code or self.error}"

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class DispatchState(models.Model):
    """The dispatcher's cursor over the log (one row): every event up to ``position`` has been
    turned into deliveries, in the transaction that moved it. The pump's last start and end
    let the worker's main process see whether one is running (``webhooks.trigger``)."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    position = models.BigIntegerField(default=0)
    pump_started_at = models.DateTimeField(null=True, blank=True)
    pump_finished_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"webhook dispatch at #{self.position}"
