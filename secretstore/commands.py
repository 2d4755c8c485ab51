"""Every change to the secrets store: one function per verb.

Each takes the caller explicitly, checks it (``secretstore.policy``), writes the row and appends
its event in one transaction. Events name the secret, its owner and version, and carry the
HMAC-SHA256 of the value under the audit key (``secretstore.crypto.fingerprint``), never the
value. Views, the API, the management command and the task call these only.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.caller import Caller
from audit import store
from audit.actor import Actor
from secretstore import crypto, policy
from secretstore.models import Secret

__all__ = [
    "MIN_VALUE_BYTES",
    "NAME_PATTERN",
    "Conflict",
    "RotationReport",
    "create_secret",
    "delete_secret",
    "event_data",
    "open_value",
    "reencrypt_all",
    "update_secret",
    "validate_name",
    "validate_value",
]

# Like an environment variable's name, so a secret's name can also be the variable it becomes.
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# Shorter values would be masked wherever their few bytes happen to occur in output.
MIN_VALUE_BYTES = 4
ROTATION = Actor.system(channel="system", name="secrets-rotation")


class Conflict(Exception):
    """The secret changed since the caller read it (its version is in the message)."""


def validate_name(name: str) -> str:
    name = (name or "").strip()
    if not NAME_PATTERN.fullmatch(name):
        raise ValidationError(
            {
                "name": "a name like an environment variable's: a letter or '_', then letters, "
                "digits or '_' (at most 128)"
            }
        )
    return name


def validate_value(value: bytes | str) -> bytes:
    raw = value.encode() if isinstance(value, str) else bytes(value)
    limit = settings.SANDBOX_SECRET_MAX_BYTES
    if not MIN_VALUE_BYTES <= len(raw) <= limit:
        raise ValidationError({"value": f"from {MIN_VALUE_BYTES} to {limit} bytes"})
    if b"\x00" in raw:
        raise ValidationError({"value": "NUL bytes are not allowed"})
    return raw


def event_data(secret: Secret, **extra: Any) -> dict[str, Any]:
    """What an event says about ``secret``: never its value."""
    return {
        "name": secret.name,
        "owner": secret.owner_label,
        "version": secret.version,
        "hmac": secret.fingerprint,
        **extra,
    }


def _seal(secret: Secret, raw: bytes) -> None:
    sealed = crypto.keyring().seal(raw, secret.aad)
    secret.key_id, secret.nonce, secret.ciphertext = sealed.key_id, sealed.nonce, sealed.ciphertext
    secret.fingerprint = crypto.fingerprint(raw)
    secret.size = len(raw)


def open_value(secret: Secret) -> bytes:
    """The value of ``secret``, decrypted (for a guest only: see ``secretstore.guests``).
    ``crypto.UnknownKey`` when its key was retired, ``crypto.DecryptionFailed`` when it does
    not authenticate."""
    sealed = crypto.Sealed(secret.key_id, bytes(secret.nonce), bytes(secret.ciphertext))
    return crypto.keyring().open(sealed, secret.aad)


def _group_named(caller: Caller, name: str) -> Group:
    group = Group.objects.filter(name=name).first()
    if group is None:
        raise ValidationError({"group": f"no group named {name!r}"})
    if group.pk not in policy.group_ids(caller.user) and not caller.has(policy.MANAGE_ALL):
        raise ValidationError({"group": f"you are not a member of {name!r}"})
    return group


@transaction.atomic
def create_secret(
    caller: Caller, *, name: str, value: bytes | str, group: str | None = None
) -> Secret:
    """Store a new secret owned by the caller, or by ``group`` (one of the caller's groups)."""
    policy.require(caller, "secretstore.add_secret")
    name = validate_name(name)
    raw = validate_value(value)
    owner_group = _group_named(caller, group) if group else None
    now = timezone.now()
    secret = Secret(
        name=name,
        owner_user=None if owner_group else caller.user,
        owner_group=owner_group,
        version=1,
        created_by=caller.user.username,
        created_at=now,
        updated_at=now,
    )
    _seal(secret, raw)
    store.lock()
    taken = Secret.objects.filter(name=name)
    taken = (
        taken.filter(owner_group=owner_group)
        if owner_group
        else taken.filter(owner_user=caller.user)
    )
    if taken.exists():
        raise ValidationError({"name": f"{secret.owner_label} already has a secret {name!r}"})
    try:
        with transaction.atomic():
            secret.save(force_insert=True)
    except IntegrityError as exc:
        raise ValidationError({"name": f"a secret {name!r} exists already"}) from exc
    store.append(
        "secret",
        str(secret.pk),
        "secret.created",
        event_data(secret, key_id=secret.key_id),
        actor=caller.actor,
        expected_version=0,
    )
    return secret


def _locked(secret: Secret) -> Secret:
    fresh = Secret.objects.select_for_update().filter(pk=secret.pk).first()
    if fresh is None:
        raise Secret.DoesNotExist(f"secret {secret.pk} is gone")
    return fresh


@transaction.atomic
def update_secret(
    caller: Caller, secret: Secret, *, value: bytes | str, expected_version: int | None = None
) -> Secret:
    """Give ``secret`` a new value: its next version. ``expected_version``: the version the
    caller saw (``Conflict`` when it moved on)."""
    policy.require(caller, "secretstore.change_secret", secret)
    raw = validate_value(value)
    store.lock()
    secret = _locked(secret)
    if expected_version is not None and expected_version != secret.version:
        raise Conflict(f"the secret is at version {secret.version}, not {expected_version}")
    secret.version += 1
    secret.updated_at = timezone.now()
    _seal(secret, raw)
    secret.save()
    store.append(
        "secret",
        str(secret.pk),
        "secret.updated",
        event_data(secret, key_id=secret.key_id),
        actor=caller.actor,
    )
    return secret


@transaction.atomic
def delete_secret(caller: Caller, secret: Secret) -> store.RecordedEvent:
    policy.require(caller, "secretstore.delete_secret", secret)
    store.lock()
    secret = _locked(secret)
    data, secret_id = event_data(secret), str(secret.pk)
    secret.delete()
    return store.append("secret", secret_id, "secret.deleted", data, actor=caller.actor)


# --- Rotation ---------------------------------------------------------------------------------


@dataclass
class RotationReport:
    current_key: str
    total: int = 0
    reencrypted: int = 0
    already_current: int = 0
    failed: list[str] | None = None


@transaction.atomic
def _reencrypt_one(secret_id: Any, current: str) -> str:
    """'done', 'current' or 'gone'. Raises crypto errors for a value that cannot be read."""
    store.lock()
    secret = Secret.objects.select_for_update().filter(pk=secret_id).first()
    if secret is None:
        return "gone"
    if secret.key_id == current:
        return "current"
    previous = secret.key_id
    raw = open_value(secret)
    sealed = crypto.keyring().seal(raw, secret.aad)
    secret.key_id, secret.nonce, secret.ciphertext = sealed.key_id, sealed.nonce, sealed.ciphertext
    secret.save(update_fields=["key_id", "nonce", "ciphertext"])
    store.append(
        "secret",
        str(secret.pk),
        "secret.reencrypted",
        event_data(secret, key_id=secret.key_id, from_key_id=previous),
        actor=ROTATION,
    )
    return "done"


def reencrypt_all(
    *,
    actor: Actor = ROTATION,
    progress: Callable[[RotationReport], None] | None = None,
) -> RotationReport:
    """Encrypt every secret not under the current key again under it, one transaction each (a
    rotation interrupted halfway is resumed by running it again). Old keys must still be
    configured until this reports no failures; then they may be retired."""
    ring = crypto.keyring()
    ids = list(Secret.objects.exclude(key_id=ring.current_id).values_list("id", flat=True))
    report = RotationReport(ring.current_id, total=len(ids), failed=[])
    with transaction.atomic():
        store.append(
            "secretstore",
            "rotation",
            "secrets.rotation_started",
            {"current_key": ring.current_id, "to_reencrypt": len(ids)},
            actor=actor,
        )
    for secret_id in ids:
        try:
            outcome = _reencrypt_one(secret_id, ring.current_id)
        except (crypto.UnknownKey, crypto.DecryptionFailed) as exc:
            assert report.failed is not None
            report.failed.append(f"{secret_id}: {exc}")
            outcome = "failed"
        if outcome == "done":
            report.reencrypted += 1
        elif outcome == "current":
            report.already_current += 1
        if progress is not None:
            progress(report)
    with transaction.atomic():
        store.append(
            "secretstore",
            "rotation",
            "secrets.rotation_completed",
            {
                "current_key": ring.current_id,
                "reencrypted": report.reencrypted,
                "failed": len(report.failed or []),
            },
            actor=actor,
        )
    return report
