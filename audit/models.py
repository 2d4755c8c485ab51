"""The event store's tables: events, projection checkpoints and signed digests.

Events and digests are append-only: database triggers (see ``audit.db``) reject UPDATE, DELETE and
TRUNCATE. Never give these models a save path other than ``audit.store``.
"""

from __future__ import annotations

import json
import uuid

from django.conf import settings
from django.db import models

__all__ = [
    "ActivityCount",
    "Digest",
    "DigestKey",
    "Event",
    "ExportJob",
    "ProjectionCheckpoint",
]


class Event(models.Model):
    """One fact, forever. ``position`` is gap-free and follows commit order."""

    position = models.BigIntegerField(primary_key=True)
    event_id = models.UUIDField(unique=True)
    aggregate_type = models.CharField(max_length=32)
    aggregate_id = models.CharField(max_length=64)
    version = models.PositiveIntegerField()
    type = models.CharField(max_length=64)
    schema_version = models.PositiveSmallIntegerField(default=1)
    # The exact canonical JSON that was hashed: jsonb would renormalize numbers and key order.
    data = models.TextField(default="{}")
    actor_type = models.CharField(max_length=16)
    actor_id = models.CharField(max_length=64, blank=True)
    actor_name = models.CharField(max_length=150, blank=True)
    token_id = models.CharField(max_length=32, blank=True)
    channel = models.CharField(max_length=16)
    source_ip = models.CharField(max_length=45, blank=True)
    request_id = models.CharField(max_length=64, blank=True)
    correlation_id = models.CharField(max_length=64, blank=True)
    causation_id = models.CharField(max_length=64, blank=True)
    recorded_at = models.DateTimeField()
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64)

    class Meta:
        ordering = ["position"]
        constraints = [
            models.UniqueConstraint(
                fields=["aggregate_type", "aggregate_id", "version"],
                name="audit_event_aggregate_version_uniq",
            ),
            models.UniqueConstraint(fields=["hash"], name="audit_event_hash_uniq"),
        ]
        # Declared here rather than with db_index/unique on the fields: on PostgreSQL those also
        # add a varchar_pattern_ops twin per text column, four more indexes every append updates.
        indexes = [
            models.Index(fields=["type", "position"], name="audit_event_type_idx"),
            models.Index(fields=["actor_id"], name="audit_event_actor_idx"),
            models.Index(fields=["correlation_id"], name="audit_event_corr_idx"),
            models.Index(fields=["recorded_at"], name="audit_event_time_idx"),
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
    range and the hash at its end, its sequence number and the SHA-256 of the previous digest's
    document, so an exported trail can be checked offline and a missing digest is found. An idle
    digest covers no events (``event_count`` 0, ``start_position`` one past ``end_position``): it
    proves that nothing was appended up to its time.
    """

    start_position = models.BigIntegerField()
    end_position = models.BigIntegerField()  # an idle digest ends where the previous one did
    event_count = models.PositiveIntegerField()
    start_prev_hash = models.CharField(max_length=64)
    end_hash = models.CharField(max_length=64)
    algorithm = models.CharField(max_length=16)
    key_id = models.CharField(max_length=64)
    document = models.TextField()
    signature = models.TextField()
    created_at = models.DateTimeField()
    # The digest chain (in the signed document too): 1, 2, 3... and the SHA-256 of the previous
    # digest's document. Null and empty for digests signed before the chain existed.
    sequence = models.BigIntegerField(null=True, unique=True)
    prev_digest_sha256 = models.CharField(max_length=64, blank=True, default="")

    class Meta:
        ordering = ["start_position", "end_position", "sequence"]

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


class DigestKey(models.Model):
    """The key history: each public key that signs digests, in the order keys were introduced.

    Append-only (database triggers, see ``audit.db``) and chained: each row's ``statement`` is
    canonical JSON naming the key, the previous row's key and the SHA-256 of the previous row's
    statement, signed by ``signed_by``: the previous key for a rotation, or the key itself for
    the first key and for a key that only configuration can vouch for. The database never
    vouches for a key by itself: ``audit.keys.trusted_public_keys`` trusts a row only when this
    host's configuration knows its public key (settings, key files, pinned fingerprints) or a
    trusted key signed its statement. Key ids are never reused.
    """

    key_id = models.CharField(max_length=64, unique=True)
    algorithm = models.CharField(max_length=16, default="ed25519")
    public_key = models.CharField(max_length=64)  # base64 of the 32 raw bytes
    fingerprint = models.CharField(max_length=64)  # SHA-256 hex of the raw bytes
    created_at = models.DateTimeField()
    # Empty on rows registered before the history was signed: those are trusted only from
    # configuration.
    statement = models.TextField(blank=True, default="")
    signed_by = models.CharField(max_length=64, blank=True, default="")
    signature = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.key_id} ({self.algorithm}, {self.fingerprint[:16]})"


class ExportJob(models.Model):
    """A compliance report or evidence bundle being produced, with its progress.

    Small exports run inline in the request; large ones in the worker, which updates
    ``processed`` as it goes so that the dashboard and the API can show progress. The file's
    SHA-256 is recorded here and in the ``audit.exported`` event appended when it is ready.
    """

    class Kind(models.TextChoices):
        REPORT = "report", "Compliance report"
        BUNDLE = "bundle", "Evidence bundle"
        ARCHIVE = "archive", "Archive bundle"

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    format = models.CharField(max_length=8)  # json, csv, pdf, zip
    framework = models.CharField(max_length=16, blank=True)
    params = models.JSONField(default=dict)  # the validated request: period, positions
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    total = models.PositiveIntegerField(default=0)  # events to go through (estimate)
    processed = models.PositiveIntegerField(default=0)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="audit_exports"
    )
    created_at = models.DateTimeField()
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    file_name = models.CharField(max_length=200, blank=True)
    size = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, blank=True)
    first_position = models.BigIntegerField(null=True, blank=True)
    last_position = models.BigIntegerField(null=True, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.kind} {self.format} {self.status} ({self.id})"

    @property
    def percent(self) -> int:
        if self.status == self.Status.DONE:
            return 100
        if not self.total:
            return 0
        return min(99, int(100 * self.processed / self.total))
