"""Every change to a webhook subscription: one function per verb.

Each takes the caller explicitly, checks it (``webhooks.policy``), validates its input (the
target is resolved and checked before the log's lock is taken: a slow resolver never holds up
other commands), writes the row and appends its event in one transaction. The signing secret is
made here, sealed with the secrets store's keys and returned once (``Issued``); no event, log
line or export holds it. Deliveries are not commands: the dispatcher records them in its own
tables; only disabling a failing subscription, an action on it, comes back here.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone

from accounts.caller import Caller
from accounts.models import User
from audit import catalogue, store
from audit.actor import Actor
from audit.commands import has_control
from secretstore import crypto
from vms import policy as vm_policy
from webhooks import policy, signing, targets
from webhooks.models import Delivery, Subscription

__all__ = [
    "MAX_FILTER_ITEMS",
    "MAX_PATTERNS",
    "Issued",
    "clean_event_types",
    "delete",
    "disable",
    "disable_failing",
    "enable",
    "ping",
    "reseal_all",
    "rotate_secret",
    "signing_secrets",
    "subscribe",
    "update",
    "visible_or_404",
]

MAX_PATTERNS = 32
MAX_FILTER_ITEMS = 100
PATTERN = re.compile(r"[a-z0-9_.*?]{1,64}")
DISPATCHER = "webhook-dispatcher"


@dataclass(frozen=True)
class Issued:
    """A subscription and its signing secret, in clear this once."""

    subscription: Subscription
    secret: str


# --- Validation -------------------------------------------------------------------------------


def _split(value: Any, field: str) -> list[str]:
    """A list of strings, or one string of items separated by commas or white space."""
    if value is None:
        return []
    if isinstance(value, str):
        items = re.split(r"[\s,]+", value)
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ValidationError({field: "a list of strings"})
    if not all(isinstance(i, str) for i in items):
        raise ValidationError({field: "a list of strings"})
    return list(dict.fromkeys(i.strip() for i in items if i.strip()))


def clean_event_types(caller: Caller, value: Any) -> list[str]:
    """Globs of event types (``vm.*``, ``snapshot.created``, ``*``): each must match a type of
    the catalogue that the caller may receive."""
    patterns = _split(value, "event_types")
    if not patterns:
        raise ValidationError({"event_types": "at least one event type or glob (vm.*, or *)"})
    if len(patterns) > MAX_PATTERNS:
        raise ValidationError({"event_types": f"at most {MAX_PATTERNS}"})
    types = catalogue.all_types()
    readable = policy.readable_aggregates(caller)
    for p in patterns:
        if not PATTERN.fullmatch(p):
            raise ValidationError(
                {"event_types": f"{p!r}: lower-case letters, digits, '_', '.', and '*' or '?'"}
            )
        matched = [t for t in types if fnmatchcase(t.name, p)]
        if not matched:
            raise ValidationError({"event_types": f"{p!r} matches no event type"})
        if readable is not None and not any(t.aggregate_type in readable for t in matched):
            raise ValidationError(
                {
                    "event_types": f"{p!r} matches only events you may not receive (yours are "
                    "the events of your VMs and of your webhooks)"
                }
            )
    return patterns


def _clean_vm_ids(caller: Caller, value: Any) -> list[str]:
    raw = _split(value, "vm_ids")
    if len(raw) > MAX_FILTER_ITEMS:
        raise ValidationError({"vm_ids": f"at most {MAX_FILTER_ITEMS}"})
    ids = []
    for item in raw:
        try:
            ids.append(str(uuid.UUID(item)))
        except ValueError as exc:
            raise ValidationError({"vm_ids": f"{item!r} is not a VM id"}) from exc
    seen = {
        str(pk)
        for pk in vm_policy.visible_vms(caller).filter(pk__in=ids).values_list("pk", flat=True)
    }
    missing = [i for i in ids if i not in seen]
    if missing:
        raise ValidationError({"vm_ids": f"no such VM: {', '.join(missing)}"})
    return ids


def _clean_owners(caller: Caller, value: Any) -> list[str]:
    names = _split(value, "owners")
    if len(names) > MAX_FILTER_ITEMS:
        raise ValidationError({"owners": f"at most {MAX_FILTER_ITEMS}"})
    if not names:
        return []
    if not vm_policy.sees_all_vms(caller) and names != [caller.user.username]:
        raise ValidationError({"owners": "you may filter only by yourself (your own VMs)"})
    found = set(User.objects.filter(username__in=names).values_list("username", flat=True))
    missing = [n for n in names if n not in found]
    if missing:
        raise ValidationError({"owners": f"no such user: {', '.join(missing)}"})
    return names


def _clean_description(value: Any) -> str:
    text = (value or "").strip() if isinstance(value, str | type(None)) else None
    if text is None or len(text) > 200 or has_control(text):
        raise ValidationError({"description": "at most 200 characters, no control characters"})
    return text


def _allow_private(caller: Caller, wanted: bool) -> bool:
    if wanted and not caller.has(policy.ALLOW_PRIVATE):
        raise PermissionDenied(
            f"only administrators ({policy.ALLOW_PRIVATE}) may allow loopback or private targets"
        )
    return wanted


def _check_target(url: str, allow_private: bool) -> targets.Target:
    try:
        target, _addresses = targets.check(
            url, allow_private=allow_private or settings.SANDBOX_WEBHOOK_ALLOW_PRIVATE
        )
    except targets.TargetRefused as exc:
        raise ValidationError({"url": str(exc)}) from exc
    return target


def event_data(sub: Subscription, **extra: Any) -> dict[str, Any]:
    """What every event of ``sub`` says about it: its owner and target, never the secret."""
    return {
        "owner": sub.owner.username,
        "target": sub.target,
        "url_hmac": crypto.fingerprint(sub.url.encode()),
        **extra,
    }


def _settings_data(sub: Subscription) -> dict[str, Any]:
    return {
        "description": sub.description,
        "event_types": list(sub.event_types),
        "filters": {"vm_ids": list(sub.vm_ids), "owners": list(sub.owners)},
        "allow_private": sub.allow_private,
    }


# --- Secrets ----------------------------------------------------------------------------------


def _seal(sub: Subscription, secret: str) -> None:
    sealed = crypto.keyring().seal(secret.encode(), sub.sealed_aad(sub.secret_version))
    sub.secret_key_id, sub.secret_nonce, sub.secret_ciphertext = (
        sealed.key_id,
        sealed.nonce,
        sealed.ciphertext,
    )


def _open(key_id: str, nonce: Any, ciphertext: Any, aad: bytes) -> str:
    sealed = crypto.Sealed(key_id, bytes(nonce), bytes(ciphertext))
    return crypto.keyring().open(sealed, aad).decode()


def signing_secrets(sub: Subscription, now: datetime | None = None) -> list[str]:
    """The secrets that sign ``sub``'s deliveries now: the current one, and the previous one
    during a rotation's grace period. ``crypto.UnknownKey`` when a key was retired."""
    now = now or timezone.now()
    out = [_open(sub.secret_key_id, sub.secret_nonce, sub.secret_ciphertext,
                 sub.sealed_aad(sub.secret_version))]  # fmt: skip
    if sub.previous_ciphertext and sub.previous_until and sub.previous_until > now:
        with contextlib.suppress(crypto.UnknownKey, crypto.DecryptionFailed):
            out.append(
                _open(
                    sub.previous_key_id,
                    sub.previous_nonce,
                    sub.previous_ciphertext,
                    sub.sealed_aad(sub.secret_version - 1),
                )  # fmt: skip
            )
    return out


# --- Verbs ------------------------------------------------------------------------------------


def _locked(sub: Subscription) -> Subscription:
    fresh = Subscription.objects.select_for_update().select_related("owner").filter(pk=sub.pk)
    row = fresh.first()
    if row is None:
        raise Subscription.DoesNotExist(f"webhook subscription {sub.pk} is gone")
    return row


def subscribe(
    caller: Caller,
    *,
    url: str,
    event_types: Any,
    vm_ids: Any = None,
    owners: Any = None,
    description: Any = "",
    allow_private: bool = False,
) -> Issued:
    """A new subscription of the caller's, with a new secret (returned once)."""
    policy.require(caller, policy.SUBSCRIBE)
    allow = _allow_private(caller, bool(allow_private))
    patterns = clean_event_types(caller, event_types)
    vm_filter, owner_filter = _clean_vm_ids(caller, vm_ids), _clean_owners(caller, owners)
    text = _clean_description(description)
    _check_target(url, allow)
    secret = signing.new_secret()
    now = timezone.now()
    scopes = sorted(caller.token.scopes) if caller.token is not None and caller.token.scopes else []
    sub = Subscription(
        owner=caller.user,
        url=url,
        description=text,
        event_types=patterns,
        vm_ids=vm_filter,
        owners=owner_filter,
        scopes=scopes,
        allow_private=allow,
        created_at=now,
        updated_at=now,
    )
    _seal(sub, secret)
    with transaction.atomic():
        store.lock()
        limit = settings.SANDBOX_WEBHOOK_MAX_PER_USER
        if Subscription.objects.filter(owner=caller.user).count() >= limit:
            raise ValidationError({"url": f"at most {limit} webhook subscriptions per user"})
        sub.save(force_insert=True)
        recorded = store.append(
            "webhook",
            str(sub.pk),
            "webhook.subscribed",
            event_data(sub, **_settings_data(sub), secret_version=1, scopes=scopes),
            actor=caller.actor,
            expected_version=0,
        )
        # Events up to its own are not delivered to it: it starts here.
        sub.start_position = recorded.position
        sub.save(update_fields=["start_position"])
    return Issued(sub, secret)


def update(
    caller: Caller,
    sub: Subscription,
    *,
    url: str | None = None,
    event_types: Any = None,
    vm_ids: Any = None,
    owners: Any = None,
    description: Any = None,
    allow_private: bool | None = None,
) -> Subscription:
    """Change what is given (None: left as it is). A new URL from a caller who may not allow
    private targets drops the subscription's permission for them."""
    policy.require(caller, policy.CHANGE, sub)
    new: dict[str, Any] = {}
    if url is not None and url != sub.url:
        new["url"] = url
    if event_types is not None:
        new["event_types"] = clean_event_types(caller, event_types)
    if vm_ids is not None:
        new["vm_ids"] = _clean_vm_ids(caller, vm_ids)
    if owners is not None:
        new["owners"] = _clean_owners(caller, owners)
    if description is not None:
        new["description"] = _clean_description(description)
    if allow_private is not None:
        new["allow_private"] = _allow_private(caller, bool(allow_private))
    elif "url" in new and not caller.has(policy.ALLOW_PRIVATE):
        new["allow_private"] = False
    if "url" in new or "allow_private" in new:
        # A target that only private permission allowed is refused once that is taken away.
        _check_target(new.get("url", sub.url), new.get("allow_private", sub.allow_private))
    with transaction.atomic():
        store.lock()
        sub = _locked(sub)
        changed = {k: v for k, v in new.items() if getattr(sub, k) != v}
        if not changed:
            return sub
        for field, value in changed.items():
            setattr(sub, field, value)
        sub.updated_at = timezone.now()
        sub.save()
        shown: dict[str, Any] = {k: v for k, v in changed.items() if k != "url"}
        if "vm_ids" in shown or "owners" in shown:
            shown["filters"] = {"vm_ids": list(sub.vm_ids), "owners": list(sub.owners)}
            shown.pop("vm_ids", None)
            shown.pop("owners", None)
        store.append(
            "webhook",
            str(sub.pk),
            "webhook.updated",
            event_data(sub, changed=sorted(changed), **shown),
            actor=caller.actor,
        )
    return sub


def delete(caller: Caller, sub: Subscription) -> store.RecordedEvent:
    """Delete ``sub`` and its delivery history (pending deliveries go with it)."""
    policy.require(caller, policy.DELETE, sub)
    with transaction.atomic():
        store.lock()
        sub = _locked(sub)
        data, sub_id = event_data(sub), str(sub.pk)
        sub.delete()
        return store.append("webhook", sub_id, "webhook.deleted", data, actor=caller.actor)


def _disable(sub: Subscription, actor: Actor, reason: str, **extra: Any) -> store.RecordedEvent:
    now = timezone.now()
    cancelled = Delivery.objects.filter(subscription=sub, status=Delivery.Status.PENDING).update(
        status=Delivery.Status.CANCELLED,
        next_attempt_at=None,
        finished_at=now,
        last_error="the subscription was disabled",
    )
    sub.active = False
    sub.disabled_reason = reason
    sub.disabled_at = now
    sub.updated_at = now
    sub.save()
    return store.append(
        "webhook",
        str(sub.pk),
        "webhook.disabled",
        event_data(
            sub,
            reason=reason,
            consecutive_failures=sub.consecutive_failures,
            cancelled_deliveries=cancelled,
            **extra,
        ),
        actor=actor,
    )


def disable(caller: Caller, sub: Subscription) -> Subscription:
    """Stop deliveries (pending ones are cancelled); nothing happens to a disabled one."""
    policy.require(caller, policy.CHANGE, sub)
    with transaction.atomic():
        store.lock()
        sub = _locked(sub)
        if sub.active:
            _disable(sub, caller.actor, "by_user")
    return sub


def disable_failing(sub_id: Any, *, last_error: str) -> store.RecordedEvent | None:
    """The dispatcher's verdict: ``sub_id`` failed ``SANDBOX_WEBHOOK_DISABLE_AFTER`` deliveries
    in a row. None when it is gone, already disabled, or a success came in between."""
    actor = Actor.system(channel="worker", name=DISPATCHER)
    with transaction.atomic():
        store.lock()
        sub = Subscription.objects.select_for_update().select_related("owner").filter(pk=sub_id)
        row = sub.first()
        limit = settings.SANDBOX_WEBHOOK_DISABLE_AFTER
        if row is None or not row.active or row.consecutive_failures < limit:
            return None
        return _disable(row, actor, "failing", last_error=last_error[:200])


def enable(caller: Caller, sub: Subscription) -> Subscription:
    """Deliver again, from the events after this one on (those in between are not sent)."""
    policy.require(caller, policy.CHANGE, sub)
    if not sub.active:
        # The target may have moved since it was checked (a DNS change): check it again.
        _check_target(sub.url, sub.allow_private)
    with transaction.atomic():
        store.lock()
        sub = _locked(sub)
        if sub.active:
            return sub
        before = sub.consecutive_failures
        sub.active = True
        sub.consecutive_failures = 0
        sub.disabled_reason, sub.disabled_at = "", None
        sub.updated_at = timezone.now()
        recorded = store.append(
            "webhook",
            str(sub.pk),
            "webhook.enabled",
            event_data(sub, consecutive_failures_before=before),
            actor=caller.actor,
        )
        sub.start_position = recorded.position
        sub.save()
    return sub


def rotate_secret(caller: Caller, sub: Subscription) -> Issued:
    """A new secret (returned once); the previous one still signs, beside it, for
    ``SANDBOX_WEBHOOK_SECRET_GRACE_S`` seconds."""
    policy.require(caller, policy.CHANGE, sub)
    secret = signing.new_secret()
    with transaction.atomic():
        store.lock()
        sub = _locked(sub)
        now = timezone.now()
        grace = int(settings.SANDBOX_WEBHOOK_SECRET_GRACE_S)
        if grace > 0:
            sub.previous_key_id = sub.secret_key_id
            sub.previous_nonce, sub.previous_ciphertext = sub.secret_nonce, sub.secret_ciphertext
            sub.previous_until = now + timedelta(seconds=grace)
        else:
            sub.previous_key_id, sub.previous_nonce, sub.previous_ciphertext = "", None, None
            sub.previous_until = None
        sub.secret_version += 1
        _seal(sub, secret)
        sub.updated_at = now
        sub.save()
        until = sub.previous_until.isoformat() if sub.previous_until else None
        store.append(
            "webhook",
            str(sub.pk),
            "webhook.secret_rotated",
            event_data(sub, secret_version=sub.secret_version, previous_valid_until=until),
            actor=caller.actor,
        )
    return Issued(sub, secret)


def ping(caller: Caller, sub: Subscription) -> store.RecordedEvent:
    """Ask for a test delivery: the ``webhook.pinged`` event goes to ``sub`` whatever its event
    types (and to other subscriptions that take it)."""
    policy.require(caller, policy.CHANGE, sub)
    if not sub.active:
        raise ValidationError({"active": "the subscription is disabled: enable it first"})
    with transaction.atomic():
        store.lock()
        sub = _locked(sub)
        return store.append(
            "webhook", str(sub.pk), "webhook.pinged", event_data(sub), actor=caller.actor
        )


def _reseal_one(sub_id: Any, current: str, actor: Actor) -> bool:
    with transaction.atomic():
        store.lock()
        sub = Subscription.objects.select_for_update().select_related("owner").get(pk=sub_id)
        moved: dict[str, str] = {}
        if sub.secret_key_id != current:
            secret = _open(sub.secret_key_id, sub.secret_nonce, sub.secret_ciphertext,
                           sub.sealed_aad(sub.secret_version))  # fmt: skip
            moved["from_key"] = sub.secret_key_id
            _seal(sub, secret)
        if sub.previous_ciphertext and sub.previous_key_id != current:
            if sub.previous_until and sub.previous_until > timezone.now():
                aad = sub.sealed_aad(sub.secret_version - 1)
                old = _open(sub.previous_key_id, sub.previous_nonce, sub.previous_ciphertext, aad)
                sealed = crypto.keyring().seal(old.encode(), aad)
                sub.previous_key_id = sealed.key_id
                sub.previous_nonce, sub.previous_ciphertext = sealed.nonce, sealed.ciphertext
            else:  # its grace is over: nothing to keep
                sub.previous_key_id, sub.previous_nonce, sub.previous_ciphertext = "", None, None
                sub.previous_until = None
            moved.setdefault("from_key", "previous secret only")
        if not moved:
            return False
        sub.save()
        store.append(
            "webhook",
            str(sub.pk),
            "webhook.secret_reencrypted",
            event_data(sub, to_key=current, secret_version=sub.secret_version, **moved),
            actor=actor,
        )
        return True


def reseal_all(ids: Iterable[Any] | None = None) -> tuple[int, list[str]]:
    """Encrypt again, under the current key of ``SANDBOX_SECRETS_KEYS``, every signing secret
    (and previous secret in its grace) under an older key. Returns (re-encrypted, failures)."""
    current = crypto.keyring().current_id
    actor = Actor.system(channel="worker", name="webhook-secrets")
    if ids is None:
        ids = Subscription.objects.exclude(secret_key_id=current).values_list("pk", flat=True)
        ids = [*ids, *Subscription.objects.exclude(previous_key_id="").exclude(
            previous_key_id=current).values_list("pk", flat=True)]  # fmt: skip
    done, failed = 0, []
    for sub_id in dict.fromkeys(ids):
        try:
            done += _reseal_one(sub_id, current, actor)
        except Subscription.DoesNotExist:
            continue
        except (crypto.UnknownKey, crypto.DecryptionFailed) as exc:
            failed.append(f"webhook {sub_id}: {exc}")
    return done, failed


def visible_or_404(caller: Caller, pk: Any) -> Subscription:
    """``Subscription.DoesNotExist`` for a missing one and one the caller may not see alike."""
    try:
        return policy.visible_subscriptions(caller).get(pk=pk)
    except (ValueError, ValidationError) as exc:
        raise Subscription.DoesNotExist(str(exc)) from exc
