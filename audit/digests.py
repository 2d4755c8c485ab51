"""Signed digests over ranges of positions, in the spirit of CloudTrail's digest files.

A digest document names a range, the hash just before it and the hash at its end, and is signed
with Ed25519 (the default: a key pair whose public half is exported, see ``audit.keys``) or
HMAC-SHA256 (a server secret; still verifiable, but only by whoever holds the secret). Ranges
follow each other without gaps, so the digests together cover the whole log: a verifier holding
an exported trail, the digests and the public keys can check everything offline
(``audit.offline``), and a log cut short after the last digest is caught because the digest
names an end the log no longer reaches.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from audit import signing
from audit.hashing import GENESIS_HASH, canonical_json
from audit.models import Digest, Event
from audit.verify import ChainProblem

__all__ = [
    "DigestDocument",
    "check_all",
    "count",
    "sign_pending",
    "verify_signature",
]


@dataclass(frozen=True)
class DigestDocument:
    start_position: int
    end_position: int
    event_count: int
    start_prev_hash: str
    end_hash: str
    created_at: str
    algorithm: str
    key_id: str

    def canonical(self) -> str:
        return canonical_json(self.__dict__)


def _hmac_sign(key_id: str, document: str) -> str:
    key = settings.SANDBOX_DIGEST_HMAC_KEYS[key_id].encode()
    return base64.b64encode(hmac.new(key, document.encode(), hashlib.sha256).digest()).decode()


def verify_signature(
    algorithm: str, key_id: str, document: str, signature: str, keys: Any = None
) -> bool:
    """True when ``signature`` is valid for ``document``.

    ``keys`` overrides where keys come from: HMAC secrets by key id, or Ed25519 public keys
    (base64) by key id. Without it, HMAC secrets come from settings and public keys from the
    registry and this host (``audit.keys.known_public_keys``).
    """
    if algorithm == signing.HMAC_SHA256:
        secrets = keys if keys is not None else settings.SANDBOX_DIGEST_HMAC_KEYS
        if key_id not in secrets:
            return False
        key = secrets[key_id].encode()
        expected = base64.b64encode(
            hmac.new(key, document.encode(), hashlib.sha256).digest()
        ).decode()
        return hmac.compare_digest(expected, signature)
    if algorithm == signing.ED25519:
        if keys is None:
            from audit.keys import known_public_keys

            keys = known_public_keys()
        public = keys.get(key_id)
        return public is not None and signing.verify(public, document, signature)
    return False


def _sign(document_for: Any) -> tuple[str, str, str, str]:
    """(algorithm, key id, document, signature) with the configured algorithm.

    ``document_for(algorithm, key_id)`` builds the canonical document, which names both.
    """
    if settings.SANDBOX_DIGEST_ALGORITHM == signing.ED25519:
        from audit.keys import current_key, register

        key_id, private = current_key()
        register(key_id, private.public_key())
        document = document_for(signing.ED25519, key_id)
        return signing.ED25519, key_id, document, signing.sign(private, document)
    key_id = settings.SANDBOX_DIGEST_HMAC_CURRENT
    document = document_for(signing.HMAC_SHA256, key_id)
    return signing.HMAC_SHA256, key_id, document, _hmac_sign(key_id, document)


def sign_pending(*, max_events: int | None = None) -> Digest | None:
    """Sign the events after the last digest, up to the head (or ``max_events`` of them)."""
    from audit.store import _lock, head

    with transaction.atomic():
        # Under the append lock: the head cannot move, and two signers cannot overlap.
        _lock()
        last = Digest.objects.order_by("-end_position").first()
        start = (last.end_position + 1) if last else 1
        start_prev_hash = last.end_hash if last else GENESIS_HASH
        end, end_hash = head()
        if max_events is not None:
            end = min(end, start + max_events - 1)
            end_hash = (
                Event.objects.values_list("hash", flat=True).get(position=end)
                if end >= start
                else end_hash
            )
        if end < start:
            return None
        created_at = datetime.now(UTC).isoformat(timespec="microseconds")

        def document_for(algorithm: str, key_id: str) -> str:
            return DigestDocument(
                start_position=start,
                end_position=end,
                event_count=end - start + 1,
                start_prev_hash=start_prev_hash,
                end_hash=end_hash,
                created_at=created_at,
                algorithm=algorithm,
                key_id=key_id,
            ).canonical()

        algorithm, key_id, document, signature = _sign(document_for)
        table = Digest._meta.db_table
        with connection.cursor() as cur:
            cur.execute(
                f"INSERT INTO {table} (start_position, end_position, event_count, start_prev_hash,"
                " end_hash, algorithm, key_id, document, signature, created_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    start,
                    end,
                    end - start + 1,
                    start_prev_hash,
                    end_hash,
                    algorithm,
                    key_id,
                    document,
                    signature,
                    connection.ops.adapt_datetimefield_value(datetime.now(UTC)),
                ],
            )
        return Digest.objects.get(end_position=end)


def count() -> int:
    return Digest.objects.count()


def check_all(last_position: int) -> ChainProblem | None:
    """Every digest: valid signature, contiguous ranges, and matching hashes in the store."""
    expected_start = 1
    prev_end_hash = GENESIS_HASH
    hashes_needed: dict[int, str] = {}
    digests = list(Digest.objects.order_by("start_position"))
    public_keys: dict[str, str] | None = None
    if any(d.algorithm == signing.ED25519 for d in digests):
        from audit.keys import known_public_keys

        public_keys = known_public_keys()
    for d in digests:
        doc = json.loads(d.document)
        keys = public_keys if d.algorithm == signing.ED25519 else None
        if not verify_signature(d.algorithm, d.key_id, d.document, d.signature, keys):
            return ChainProblem(d.end_position, "digest", f"digest {d.pk} has a bad signature")
        if (
            doc["start_position"],
            doc["end_position"],
            doc["end_hash"],
            doc["start_prev_hash"],
            doc["algorithm"],
            doc["key_id"],
        ) != (
            d.start_position,
            d.end_position,
            d.end_hash,
            d.start_prev_hash,
            d.algorithm,
            d.key_id,
        ):
            return ChainProblem(
                d.end_position, "digest", f"digest {d.pk} row differs from its signed document"
            )
        if d.start_position != expected_start or d.start_prev_hash != prev_end_hash:
            return ChainProblem(
                d.start_position, "digest", f"digest {d.pk} does not follow the previous one"
            )
        if d.end_position > last_position:
            return ChainProblem(
                last_position + 1,
                "missing",
                f"the log ends at {last_position} but digest {d.pk} signed events up to "
                f"{d.end_position}",
            )
        hashes_needed[d.end_position] = d.end_hash
        expected_start = d.end_position + 1
        prev_end_hash = d.end_hash
    if hashes_needed:
        stored = dict(
            Event.objects.filter(position__in=list(hashes_needed)).values_list("position", "hash")
        )
        for position, h in sorted(hashes_needed.items()):
            if stored.get(position) != h:
                return ChainProblem(
                    position, "digest", "the event's hash differs from the signed digest"
                )
    return None
