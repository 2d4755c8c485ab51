"""What an attacker who can write to the database (and lift its triggers) does, for the tests:
rewrite events with a recomputed chain, sign digests with a key of their own, cut the tail."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.db import connection

from audit.hashing import event_hash
from audit.store import COLUMNS, RecordedEvent


def sql(statement: str, params: list | None = None) -> None:
    with connection.cursor() as cur:
        cur.execute(statement, params or [])


def events_from(position: int) -> list[RecordedEvent]:
    with connection.cursor() as cur:
        cur.execute(
            f"SELECT {', '.join(COLUMNS)} FROM audit_event WHERE position >= %s ORDER BY position",
            [position],
        )
        return [RecordedEvent.from_row(row) for row in cur.fetchall()]


def forge_event(position: int, data: str) -> None:
    """Replace an event's data and recompute every hash from there on (triggers lifted)."""
    before = events_from(position - 1)[0] if position > 1 else None
    prev = before.hash if before else "0" * 64
    for event in events_from(position):
        fields = event.hashed_fields()
        if event.position == position:
            fields["data"] = data
        fields["prev_hash"] = prev
        new_hash = event_hash(fields, fields["data"], prev)
        sql(
            "UPDATE audit_event SET data = %s, prev_hash = %s, hash = %s WHERE position = %s",
            [fields["data"], prev, new_hash, event.position],
        )
        prev = new_hash


@contextlib.contextmanager
def attacker_host(settings: Any, tmp_path: Any, key_id: str = "evil") -> Iterator[Any]:
    """Run the product's own code with the attacker's key and sink, as a forger would."""
    private = Ed25519PrivateKey.generate()
    seed = base64.b64encode(private.private_bytes_raw()).decode()
    saved = {
        name: getattr(settings, name, None)
        for name in (
            "SANDBOX_DIGEST_ED25519_KEYS",
            "SANDBOX_DIGEST_ED25519_CURRENT",
            "SANDBOX_DIGEST_ED25519_DIR",
            "SANDBOX_DIGEST_SINK_DIR",
            "SANDBOX_DIGEST_ALGORITHM",
            "SANDBOX_DIGEST_ED25519_PUBLIC_KEYS",
        )
    }
    from audit.models import DigestKey

    # The forger's host trusts every key in the database (what verification used to do).
    settings.SANDBOX_DIGEST_ED25519_PUBLIC_KEYS = ",".join(
        f"{k}:{p}" for k, p in DigestKey.objects.values_list("key_id", "public_key")
    )
    settings.SANDBOX_DIGEST_ED25519_KEYS = f"{key_id}:{seed}"
    settings.SANDBOX_DIGEST_ED25519_CURRENT = key_id
    settings.SANDBOX_DIGEST_ED25519_DIR = tmp_path / "attacker-keys"
    settings.SANDBOX_DIGEST_SINK_DIR = tmp_path / "attacker-sink"
    settings.SANDBOX_DIGEST_ALGORITHM = "ed25519"
    try:
        yield private
    finally:
        for name, value in saved.items():
            setattr(settings, name, value)
