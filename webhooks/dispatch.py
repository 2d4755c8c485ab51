"""From the log to the receivers: the dispatcher's cursor, the claims, the attempts.

**Fan-out.** One cursor over the log (``DispatchState``): under its row lock, the events after it
(of the types some active subscription takes) become ``Delivery`` rows, one per subscription
that takes the event, and the cursor moves past them, in one transaction. So each event is
fanned out exactly once, whatever crashes, and a command only ever appends its event: nothing in
it waits for a receiver. A subscription takes an event recorded after its start (its
subscription or re-enabling) that matches its types and filters and that its owner may read
(``webhooks.policy``); a ``webhook.pinged`` event also goes to the subscription it names.

**Attempts.** A due delivery is *claimed* (its attempt counted, its due time moved past the
attempt's longest run) by a conditional update, so two pumps never send one attempt twice; then
sent from a thread (``webhooks.sender``), and its outcome recorded: delivered on a 2xx, else due
again after an exponential back-off with jitter, until ``SANDBOX_WEBHOOK_MAX_ATTEMPTS``. A
worker that dies after sending and before recording leaves the claim to lapse: the attempt is
made again. Hence *at least once*: a receiver deduplicates on ``Sandbox-Event-Id``.

**Order.** A subscription's deliveries are claimed and sent in log order, one after the other;
when one fails, the rest of that subscription's claimed deliveries are held back until its
retry (not counted as attempts): a receiver that is down sees one delivery at a time, and the
backlog flows in order once it answers. A retried delivery can still arrive after a later one
was delivered (a crash, a receiver that failed one and accepted the next): receivers order by
``event.position``, which follows the log's commit order.

**Failing.** A delivery that runs out of attempts is *failed*; ``SANDBOX_WEBHOOK_DISABLE_AFTER``
failed deliveries in a row (a success resets the count) disable the subscription
(``webhook.disabled``, by the dispatcher) and cancel what it still had pending.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from audit import catalogue
from audit.events import COLUMNS, RecordedEvent, head, iter_events
from audit.models import Event
from secretstore import crypto
from webhooks import commands, policy, sender, signing
from webhooks.models import Delivery, DeliveryAttempt, DispatchState, Subscription

__all__ = [
    "PINGED",
    "Job",
    "PumpReport",
    "backoff_s",
    "body_of",
    "claim",
    "fan_out",
    "prune",
    "pump",
    "pump_timeout_s",
]

log = logging.getLogger("sandbox.webhooks")

PINGED = "webhook.pinged"
FANOUT_BATCH = 500
CLAIM_LIMIT = 50  # deliveries claimed per round
PER_SUBSCRIPTION = 10  # of which at most this many of one subscription (sent one by one)
USER_AGENT = "MicroVM-Sandbox-Webhooks/1"


# --- Settings as numbers ------------------------------------------------------------------------


def _timeout_s() -> float:
    return float(settings.SANDBOX_WEBHOOK_TIMEOUT_S)


def claim_lease_s() -> float:
    """How long a claim holds a delivery: its subscription's claimed attempts, one by one."""
    return PER_SUBSCRIPTION * (_timeout_s() + 1) + 30


def pump_timeout_s() -> int:
    """The pump task's limit in the worker: its run, a last round of sends, and a margin."""
    return int(settings.SANDBOX_WEBHOOK_PUMP_S + claim_lease_s() + 30)


def backoff_s(attempt: int) -> float:
    """The wait after failed attempt number ``attempt`` (1, 2, ...): doubling from the base,
    capped, and jittered down by up to half so that receivers are not hit in waves."""
    base = float(settings.SANDBOX_WEBHOOK_BACKOFF_BASE_S)
    cap = float(settings.SANDBOX_WEBHOOK_BACKOFF_MAX_S)
    delay = min(cap, base * 2 ** max(0, attempt - 1))
    return delay * random.uniform(0.5, 1.0)


# --- Fan-out ------------------------------------------------------------------------------------


def _state_for_update() -> DispatchState:
    DispatchState.objects.get_or_create(pk=1)
    return DispatchState.objects.select_for_update().get(pk=1)


def _deliveries_for(
    events: Sequence[RecordedEvent], subs: Sequence[Subscription]
) -> list[Delivery]:
    scopes = policy.event_scopes(events)
    readers = {s.pk: policy.reader(s) for s in subs}
    now = timezone.now()
    rows = []
    for e in events:
        scope = scopes[e.position]
        for s in subs:
            if e.position <= s.start_position:
                continue
            if not (e.type == PINGED and e.aggregate_id == str(s.pk)):
                if not s.matches_type(e.type):
                    continue
                if s.vm_ids and scope.vm_id not in s.vm_ids:
                    continue
                if s.owners and scope.owner_name not in s.owners:
                    continue
            reader = readers[s.pk]
            if reader is None or not policy.may_read(reader, e, scope):
                continue
            rows.append(
                Delivery(
                    subscription=s,
                    event_position=e.position,
                    event_id=e.event_id,
                    event_type=e.type,
                    next_attempt_at=now,
                    created_at=now,
                )
            )
    return rows


def fan_out(*, batch: int = FANOUT_BATCH, max_batches: int = 20) -> int:
    """Turn the events after the cursor into deliveries; returns how many were made."""
    made = 0
    for _ in range(max_batches):
        with transaction.atomic():
            state = _state_for_update()
            until = head()[0]
            if until <= state.position:
                return made
            subs = list(Subscription.objects.filter(active=True).select_related("owner"))
            # Nothing at or before every active subscription's start is anyone's.
            after = max(state.position, min((s.start_position for s in subs), default=until))
            events: list[RecordedEvent] = []
            if subs and after < until:
                names = {PINGED} | {
                    t.name
                    for t in catalogue.all_types()
                    if any(s.matches_type(t.name) for s in subs)
                }
                batches = iter_events(after, until=until, types=frozenset(names), batch=batch)
                events = next(batches, [])
            rows = _deliveries_for(events, subs) if events else []
            Delivery.objects.bulk_create(rows, ignore_conflicts=True)
            made += len(rows)
            done = len(events) < batch
            state.position = until if done else events[-1].position
            state.save(update_fields=["position"])
        if done:
            return made
    return made


# --- Claims -------------------------------------------------------------------------------------


def claim(*, limit: int = CLAIM_LIMIT, per_subscription: int = PER_SUBSCRIPTION) -> list[Delivery]:
    """Claim due deliveries (their attempt counted now), oldest due first, at most
    ``per_subscription`` of one subscription; in log order."""
    now = timezone.now()
    lease = now + timedelta(seconds=claim_lease_s())
    due = Delivery.objects.filter(status=Delivery.Status.PENDING, next_attempt_at__lte=now)
    candidates = due.order_by("next_attempt_at", "event_position").values_list(
        "pk", "next_attempt_at", "subscription_id"
    )[: limit * 4]
    taken: list[Any] = []
    per: dict[Any, int] = defaultdict(int)
    for pk, due_at, sub_id in candidates:
        if len(taken) >= limit:
            break
        if per[sub_id] >= per_subscription:
            continue
        won = Delivery.objects.filter(
            pk=pk, status=Delivery.Status.PENDING, next_attempt_at=due_at
        ).update(next_attempt_at=lease, attempts=F("attempts") + 1)
        if won:
            taken.append(pk)
            per[sub_id] += 1
    rows = Delivery.objects.filter(pk__in=taken).select_related("subscription__owner")
    return list(rows.order_by("event_position"))


# --- Sending ------------------------------------------------------------------------------------


def body_of(delivery: Delivery, event: RecordedEvent) -> bytes:
    """The JSON body: the event as the events API shows it, and the delivery's ids."""
    doc = {
        "delivery_id": str(delivery.pk),
        "subscription_id": str(delivery.subscription_id),
        "event": event.as_dict(),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class Job:
    """One claimed delivery, ready to send (no database needed from here)."""

    delivery: Delivery
    url: str
    body: bytes
    headers: dict[str, str]
    secrets: list[str]
    allow_private: bool
    started_at: datetime | None = None
    outcome: sender.Outcome | None = None


def _events_at(positions: Sequence[int]) -> dict[int, RecordedEvent]:
    rows = Event.objects.filter(position__in=list(positions)).values_list(*COLUMNS)
    return {(e := RecordedEvent.from_row(r)).position: e for r in rows}


def _settle(delivery: Delivery, status: str, why: str) -> None:
    Delivery.objects.filter(pk=delivery.pk).update(
        status=status, next_attempt_at=None, finished_at=timezone.now(), last_error=why[:200]
    )


def _prepare(claimed: Sequence[Delivery]) -> tuple[list[Job], list[Job]]:
    """(jobs to send, jobs already failed without sending: a secret that cannot be read).
    Deliveries whose subscription was disabled are cancelled, those whose event its owner may
    no longer read are skipped: neither is sent."""
    events = _events_at([d.event_position for d in claimed])
    scopes = policy.event_scopes(events.values())
    site_private = bool(settings.SANDBOX_WEBHOOK_ALLOW_PRIVATE)
    readers: dict[Any, Any] = {}
    jobs, failed = [], []
    for d in claimed:
        sub = d.subscription
        if not sub.active:
            _settle(d, Delivery.Status.CANCELLED, "the subscription was disabled")
            continue
        event = events.get(d.event_position)
        if sub.pk not in readers:
            readers[sub.pk] = policy.reader(sub)
        reader = readers[sub.pk]
        if (
            event is None
            or reader is None
            or not policy.may_read(reader, event, scopes[event.position])
        ):
            _settle(d, Delivery.Status.SKIPPED, "its owner may not read this event (now)")
            continue
        body = body_of(d, event)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Sandbox-Event-Id": event.event_id,
            "Sandbox-Event-Type": event.type,
            "Sandbox-Delivery-Id": str(d.pk),
            "Sandbox-Delivery-Attempt": str(d.attempts),
        }
        job = Job(d, sub.url, body, headers, [], sub.allow_private or site_private)
        try:
            job.secrets = commands.signing_secrets(sub)
        except (crypto.UnknownKey, crypto.DecryptionFailed) as exc:
            job.started_at = datetime.now(UTC)
            job.outcome = sender.Outcome(None, f"the signing secret cannot be read: {exc}", 0)
            failed.append(job)
            continue
        jobs.append(job)
    return jobs, failed


def _send_group(group: list[Job]) -> None:
    """One subscription's jobs, in order; stops at the first failure (the rest wait)."""
    timeout = _timeout_s()
    for job in group:
        job.started_at = datetime.now(UTC)
        headers = dict(job.headers)
        headers[signing.SIGNATURE_HEADER] = signing.signature_header(job.secrets, job.body)
        job.outcome = sender.post(
            job.url, job.body, headers, allow_private=job.allow_private, timeout=timeout
        )
        if not job.outcome.ok:
            return


def _send(jobs: Sequence[Job]) -> None:
    groups: dict[Any, list[Job]] = defaultdict(list)
    for job in jobs:
        groups[job.delivery.subscription_id].append(job)
    if not groups:
        return
    workers = max(1, min(int(settings.SANDBOX_WEBHOOK_CONCURRENCY), len(groups)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="webhook-send") as pool:
        for future in [pool.submit(_send_group, g) for g in groups.values()]:
            future.result()


# --- Outcomes -----------------------------------------------------------------------------------


@dataclass
class PumpReport:
    fanned_out: int = 0
    attempts: int = 0
    delivered: int = 0
    failed: int = 0  # deliveries out of attempts
    retrying: int = 0
    disabled: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "fanned_out": self.fanned_out,
            "attempts": self.attempts,
            "delivered": self.delivered,
            "failed": self.failed,
            "retrying": self.retrying,
            "disabled": list(self.disabled),
        }


def _record(job: Job, report: PumpReport) -> datetime | None:
    """Keep the attempt and move the delivery on; returns when it is due again (None: done)."""
    d, outcome = job.delivery, job.outcome
    assert outcome is not None and job.started_at is not None
    now = timezone.now()
    number = d.attempts
    report.attempts += 1
    retry_at = None
    if outcome.ok:
        status, finished = Delivery.Status.DELIVERED, now
        report.delivered += 1
    elif number >= int(settings.SANDBOX_WEBHOOK_MAX_ATTEMPTS):
        status, finished = Delivery.Status.FAILED, now
        report.failed += 1
    else:
        status, finished = Delivery.Status.PENDING, None
        retry_at = now + timedelta(seconds=backoff_s(number))
        report.retrying += 1
    with transaction.atomic():
        # Locked against a delete of its subscription meanwhile (the delete takes its rows).
        if not Delivery.objects.select_for_update().filter(pk=d.pk).exists():
            return None
        DeliveryAttempt.objects.create(
            delivery=d,
            number=number,
            started_at=job.started_at,
            duration_ms=outcome.duration_ms,
            address=outcome.address,
            status_code=outcome.status_code,
            error=outcome.error[:200],
            response_excerpt=outcome.excerpt,
            next_retry_at=retry_at,
        )
        Delivery.objects.filter(pk=d.pk).update(
            status=status,
            next_attempt_at=retry_at,
            finished_at=finished,
            last_status_code=outcome.status_code,
            last_error=outcome.error[:200],
        )
        subs = Subscription.objects.filter(pk=d.subscription_id)
        if outcome.ok:
            subs.update(consecutive_failures=0, last_success_at=now)
        elif status == Delivery.Status.FAILED:
            subs.update(
                consecutive_failures=F("consecutive_failures") + 1,
                last_failure_at=now,
                last_error=outcome.error[:200],
            )
        else:
            subs.update(last_failure_at=now, last_error=outcome.error[:200])
    if status == Delivery.Status.FAILED:
        failures = subs.values_list("consecutive_failures", flat=True).first() or 0
        if failures >= int(settings.SANDBOX_WEBHOOK_DISABLE_AFTER):
            if commands.disable_failing(d.subscription_id, last_error=outcome.error):
                report.disabled.append(str(d.subscription_id))
                log.warning(
                    "webhook subscription disabled after failed deliveries",
                    extra={"subscription": str(d.subscription_id), "failures": failures},
                )
    return retry_at


def _hold_back(held: Sequence[Job], until: datetime | None) -> None:
    """Give back claims that were not attempted: not counted, due with the one that failed."""
    for job in held:
        Delivery.objects.filter(pk=job.delivery.pk, status=Delivery.Status.PENDING).update(
            attempts=F("attempts") - 1, next_attempt_at=until or timezone.now()
        )


def _round(claimed: Sequence[Delivery], report: PumpReport) -> None:
    jobs, unreadable = _prepare(claimed)
    _send(jobs)
    for job in unreadable:
        _record(job, report)
    by_sub: dict[Any, list[Job]] = defaultdict(list)
    for job in jobs:
        by_sub[job.delivery.subscription_id].append(job)
    for group in by_sub.values():
        retry_at: datetime | None = None
        for i, job in enumerate(group):
            if job.outcome is None:  # held back behind a failure
                _hold_back(group[i:], retry_at)
                break
            retry_at = _record(job, report)


def pump(max_seconds: float | None = None) -> PumpReport:
    """Fan out and send until nothing is due (or ``max_seconds``: SANDBOX_WEBHOOK_PUMP_S)."""
    limit = float(settings.SANDBOX_WEBHOOK_PUMP_S if max_seconds is None else max_seconds)
    started = time.monotonic()
    report = PumpReport()
    DispatchState.objects.get_or_create(pk=1)
    DispatchState.objects.filter(pk=1).update(pump_started_at=timezone.now())
    try:
        while True:
            report.fanned_out += fan_out()
            claimed = claim()
            if not claimed:
                break
            _round(claimed, report)
            if time.monotonic() - started >= limit:
                break
    finally:
        DispatchState.objects.filter(pk=1).update(pump_finished_at=timezone.now())
    return report


def prune(now: datetime | None = None, *, batch: int = 1000) -> int:
    """Delete finished deliveries (with their attempts) older than the retention."""
    days = int(settings.SANDBOX_WEBHOOK_RETENTION_DAYS)
    cutoff = (now or timezone.now()) - timedelta(days=days)
    removed = 0
    while True:
        ids = list(
            Delivery.objects.filter(finished_at__lt=cutoff).values_list("pk", flat=True)[:batch]
        )
        if not ids:
            return removed
        DeliveryAttempt.objects.filter(delivery_id__in=ids).delete()
        removed += Delivery.objects.filter(pk__in=ids).delete()[1].get("webhooks.Delivery", 0)
