"""The secrets store's event types, registered in the audit catalogue.

Every event of a secret names it, its owner, its version and an HMAC-SHA256 of its value under a
key of its own (``SANDBOX_SECRETS_HMAC_KEY``), as Vault's audit devices do: two events about the
same value can be matched, and a value a person holds can be checked against the log, without
the log holding the value or anything it can be decrypted from.
"""

from __future__ import annotations

from audit import catalogue
from audit.catalogue import EventType

__all__ = ["SECRET_TYPES"]

SECRET_TYPES = (
    EventType(
        "secret.created",
        "secret",
        1,
        "change",
        "A secret was stored (name, owner, version 1 and the HMAC of its value; never the value).",
    ),
    EventType(
        "secret.updated",
        "secret",
        1,
        "change",
        "A secret was given a new value: a new version (and the HMAC of the new value).",
    ),
    EventType(
        "secret.deleted",
        "secret",
        1,
        "change",
        "A secret was deleted: its ciphertext is gone; its name may be used again.",
    ),
    EventType(
        "secret.reencrypted",
        "secret",
        1,
        "operations",
        "A secret's value was encrypted again under the current key (key ids in data); its "
        "version and value are unchanged.",
        not_evidence="a key rotation's step: the value and who may read it are unchanged",
    ),
    EventType(
        "secrets.rotation_started",
        "secretstore",
        1,
        "operations",
        "Re-encryption of every secret under the current key started (how many in data).",
        not_evidence="a key rotation's progress: no value or access changes",
    ),
    EventType(
        "secrets.rotation_completed",
        "secretstore",
        1,
        "operations",
        "Re-encryption finished: how many were encrypted again, and under which key.",
        not_evidence="a key rotation's progress: no value or access changes",
    ),
)

catalogue.register(*SECRET_TYPES)
