"""The webhook subscriptions' event types, registered in the audit catalogue.

Events of a subscription name its owner and its target's origin (scheme, host and port) with an
HMAC of the whole URL under the secrets store's audit key (a URL's path or query often carries
a token of the receiver's), its event types and filters; never its signing secret, nor anything
it could be decrypted from. Individual delivery attempts are not events (``webhooks.models``).
"""

from __future__ import annotations

from audit import catalogue
from audit.catalogue import EventType

__all__ = ["WEBHOOK_TYPES"]

WEBHOOK_TYPES = (
    EventType(
        "webhook.subscribed",
        "webhook",
        1,
        "change",
        "A webhook subscription was made (owner, target origin and URL HMAC, event types, "
        "filters, whether private targets are allowed; never its secret).",
    ),
    EventType(
        "webhook.updated",
        "webhook",
        1,
        "change",
        "A webhook subscription's target, event types, filters or description changed (the "
        "new values in data).",
    ),
    EventType(
        "webhook.deleted",
        "webhook",
        1,
        "change",
        "A webhook subscription was deleted with its delivery history.",
    ),
    EventType(
        "webhook.disabled",
        "webhook",
        1,
        "change",
        "A webhook subscription was disabled: by a person, or by the dispatcher after too many "
        "failed deliveries in a row (reason, failure count and last error in data).",
    ),
    EventType(
        "webhook.enabled",
        "webhook",
        1,
        "change",
        "A disabled webhook subscription was enabled again; it receives events from here on.",
    ),
    EventType(
        "webhook.secret_rotated",
        "webhook",
        1,
        "change",
        "A webhook subscription got a new signing secret (its version, and until when the "
        "previous one still signs).",
    ),
    EventType(
        "webhook.secret_reencrypted",
        "webhook",
        1,
        "operations",
        "A webhook's signing secret was encrypted again under the current key (key ids in "
        "data); the secret is unchanged.",
        not_evidence="a key rotation's step: the secret and who receives what are unchanged",
    ),
    EventType(
        "webhook.pinged",
        "webhook",
        1,
        "operations",
        "A test delivery to a webhook subscription was asked for: this event is delivered to "
        "it whatever its event types.",
        not_evidence="a test of a receiver: nothing changes",
    ),
)

catalogue.register(*WEBHOOK_TYPES)
