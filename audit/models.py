"""The event store's tables: events, projection checkpoints and signed digests.

Events and digests are append-only: database triggers (see ``audit.db``) reject UPDATE, DELETE and
TRUNCATE. Never give these models a save path other than ``audit.store``.
"""

from __future__ import annotations

from django.db import models

__all__ = ["ActivityCount", "Digest", "Event", "ProjectionCheckpoint"]


class Event(models.Model):
    """One fact, forever. ``position`` is gap-free and follows commit order."""

    position = models.BigIntegerField(primary_key=True)
    event_id = models.UUIDField(unique=True)
    aggregate_type = models.CharField(max_length=32)
    aggregate_id = models.CharField(max_length=64)
    version = models.PositiveIntegerField()
    type = models.CharField(max_length=64, db_index=True)
    schema_version = models.PositiveSmallIntegerField(default=1)
    # The exact canonical JSON that was hashed: jsonb would renormalize numbers and key order.
    data = models.TextField(default="{}")
    actor_type = models.CharField(max_length=16)
    actor_id = models.CharField(max_length=64, blank=True, db_index=True)
    actor_name = models.CharField(max_length=150, blank=True)
    token_id = models.CharField(max_length=32, blank=True)
    channel = models.CharField(max_length=16)
    source_ip = models.CharField(max_length=45, blank=True)
    request_id = models.CharField(max_length=64, blank=True)
    correlation_id = models.CharField(max_length=64, blank=True, db_index=True)
    causation_id = models.CharField(max_length=64, blank=True)
    recorded_at = models.DateTimeField(db_index=True)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)

    class Meta:
        ordering = ["position"]
        constraints = [
            models.UniqueConstraint(
                fields=["aggregate_type", "aggregate_id", "version"],
                name="audit_event_aggregate_version_uniq",
            )
        ]
        permissions = [
            ("view_audit_trail", "Can read the whole audit trail"),
            ("export_audit", "Can export audit reports and evidence bundles"),
            ("verify_audit", "Can run chain verification"),
        ]

    def __str__(self) -> str:
        return f"#{self.position} {self.type} {self.aggregate_type}:{self.aggregate_id}"

    @property
    def payload(self) -> dict:
        import json

        return json.loads(self.data)


class ProjectionCheckpoint(models.Model):
    """How far one projection has applied the log; written in the same transaction as its rows."""

    name = models.CharField(max_length=64, primary_key=True)
    position = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.name}@{self.position}"


class Digest(models.Model):
    """A signature over the chain from ``start_position`` to ``end_position`` inclusive.

    ``document`` is the canonical JSON that was signed; it names the range, the hash before the
    range and the hash at its end, so an exported trail can be checked offline.
    """

    start_position = models.BigIntegerField()
    end_position = models.BigIntegerField(unique=True)
    event_count = models.PositiveIntegerField()
    start_prev_hash = models.CharField(max_length=64)
    end_hash = models.CharField(max_length=64)
    algorithm = models.CharField(max_length=16)
    key_id = models.CharField(max_length=64)
    document = models.TextField()
    signature = models.TextField()
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["end_position"]

    def __str__(self) -> str:
        return f"digest {self.start_position}..{self.end_position} ({self.key_id})"


class ActivityCount(models.Model):
    """Projection: events per day, type and actor, for statistics and compliance reports."""

    day = models.DateField()
    event_type = models.CharField(max_length=64)
    actor_name = models.CharField(max_length=150, blank=True)
    count = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["day", "event_type", "actor_name"], name="audit_activity_key_uniq"
            )
        ]

    def __str__(self) -> str:
        return f"{self.day} {self.event_type} {self.actor_name}: {self.count}"
