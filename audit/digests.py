"""Signed digests over ranges of positions, in the spirit of CloudTrail's digest files.

A digest document names a range, the hash just before it and the hash at its end, its sequence
number and the SHA-256 of the previous digest's document (the digest chain), and is signed with
Ed25519 (the default: a key pair whose public half is exported, see ``audit.keys``) or
HMAC-SHA256 (a server secret; still verifiable, but only by whoever holds the secret). Ranges
follow each other without gaps, so the digests together cover the whole log; an idle digest
covers no events and proves that nothing was appended up to its time. The worker signs one
every minute, busy or idle, and each digest is copied as it is signed to the sink outside the
database (``audit.sink``).

What this catches: a changed, removed or inserted event before the newest digest (its hashes
no longer match a signature); a removed digest (the chain of sequence numbers and document
hashes breaks); the newest events cut off together with the digests that cover them (the sink
and any earlier bundle still hold those digests). What it cannot: events appended after the
newest digest are not yet signed (a minute at most while the worker runs; the metric
``sandbox_audit_events_unsigned`` shows how many).

Signing refuses (``ChainBroken``) to put a signature over a chain that is already broken: the
key history must be trusted, the previous digest must match the stored event at its end and its
copy in the sink, and every event since must link and hash.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from audit import signing, sink
from audit.events import append_lock, head, iter_events
from audit.hashing import GENESIS_HASH, canonical_json
from audit.keys import KeyTrustError, current_key, register, trusted_public_keys
from audit.models import Digest, Event
from audit.verify import ChainProblem, verify_events

__all__ = [
    "ChainBroken",
    "DigestDocument",
    "check_against_bundle",
    "check_all",
    "check_digests",
    "check_sink",
    "count",
    "last_digest",
    "sign_pending",
    "sink_continuity",
    "verify_signature",
    "vouched_end",
]


class ChainBroken(Exception):
    """The chain is already broken: signing (or exporting) over it is refused."""

    def __init__(self, problem: ChainProblem) -> None:
        self.problem = problem
        super().__init__(str(problem))


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
    sequence: int
    prev_digest_sha256: str

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
    (base64) by key id. Without it, HMAC secrets come from settings and public keys are the ones
    this host trusts (``audit.keys.trusted_public_keys``, which raises ``KeyTrustError`` when
    the key history holds a key nothing vouches for).
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
            keys = trusted_public_keys()
        public = keys.get(key_id)
        return public is not None and signing.verify(public, document, signature)
    return False


def _signer() -> tuple[str, str, Any]:
    """(algorithm, key id, sign(document) -> signature) of the configured algorithm.

    An Ed25519 key is registered in the key history first (and a different key under its id
    refused), so that the checks before signing see the key history as it will be.
    """
    if settings.SANDBOX_DIGEST_ALGORITHM == signing.ED25519:
        key_id, private = current_key()
        register(key_id, private)
        return signing.ED25519, key_id, lambda document: signing.sign(private, document)
    hmac_id = settings.SANDBOX_DIGEST_HMAC_CURRENT
    return signing.HMAC_SHA256, hmac_id, lambda document: _hmac_sign(hmac_id, document)


def last_digest() -> Digest | None:
    """The newest digest: the highest sequence, or for digests older than the chain, the end."""
    return Digest.objects.order_by("-start_position", "-end_position", "-sequence").first()


def _key_problem() -> ChainProblem | None:
    try:
        trusted_public_keys()
    except KeyTrustError as exc:
        return ChainProblem(0, "key", f"untrusted digest key history: {exc}")
    return None


def _stored_hash(position: int) -> str | None:
    return Event.objects.filter(position=position).values_list("hash", flat=True).first()


def _check_before_signing(
    last: Digest | None, end: int, newest_copy: tuple[bool, sink.SinkEntry | None]
) -> None:
    """Raise ``ChainBroken`` unless the chain from the previous digest to ``end`` is intact."""
    problem = _key_problem()
    if problem is None and last is not None:
        problem = check_digests([last], last_position=end, previous=None, first=False)
    if problem is None and last is not None and last.end_position >= 1:
        stored = _stored_hash(last.end_position)
        if stored is None:
            problem = ChainProblem(
                last.end_position,
                "missing",
                f"the log no longer reaches position {last.end_position}, which digest "
                f"{last.pk} signed: the tail was cut",
            )
        elif stored != last.end_hash:
            problem = ChainProblem(
                last.end_position, "digest", "the event's hash differs from the signed digest"
            )
    if problem is None and newest_copy[0]:
        problem = sink_continuity(last, newest_copy[1])
    if problem is None:
        start = last.end_position + 1 if last else 1
        prev_hash = last.end_hash if last else GENESIS_HASH

        def stream() -> Any:
            for batch in iter_events(start - 1, until=end, batch=5000):
                yield from batch

        report = verify_events(stream(), start_position=start, start_prev_hash=prev_hash)
        problem = report.problem
        if problem is None and report.last_position != end:
            problem = ChainProblem(
                report.last_position + 1, "missing", "events vanished while signing"
            )
    if problem is not None:
        raise ChainBroken(problem)


def sign_pending(*, max_events: int | None = None, idle: bool = False) -> Digest | None:
    """Sign the events after the last digest, up to the head (or ``max_events`` of them).

    With ``idle``, a digest is signed even when no event was appended (covering none): the
    worker does so every minute, so that the newest digest is never older than a minute and a
    verifier can tell a quiet log from a cut one. Raises ``ChainBroken`` (nothing signed) when
    the chain since the previous digest, the previous digest or the key history is broken, and
    ``audit.sink.SinkError`` when the copy outside the database cannot be made.
    """

    with transaction.atomic():
        # Under the append lock: the head cannot move, and two signers cannot overlap.
        append_lock()
        last = last_digest()
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
        if end < start - 1:
            # The head is behind the previous digest's end: the tail was cut.
            end = start - 1
        if end < start and not idle:
            return None
        if end < start:
            end_hash = start_prev_hash
        algorithm, key_id, sign = _signer()
        destination = sink.configured()
        readable, newest_copy = sink.newest_of(destination)
        _check_before_signing(last, end, (readable, newest_copy))
        if readable:
            _catch_up(destination, newest_copy, last)
        sequence = (last.sequence or 0) + 1 if last else 1
        prev_digest = signing.document_sha256(last.document) if last else signing.GENESIS_DIGEST
        created_at = datetime.now(UTC).isoformat(timespec="microseconds")

        document = DigestDocument(
            start_position=start,
            end_position=end,
            event_count=end - start + 1,
            start_prev_hash=start_prev_hash,
            end_hash=end_hash,
            created_at=created_at,
            algorithm=algorithm,
            key_id=key_id,
            sequence=sequence,
            prev_digest_sha256=prev_digest,
        ).canonical()
        signature = sign(document)
        table = Digest._meta.db_table
        with connection.cursor() as cur:
            cur.execute(
                f"INSERT INTO {table} (start_position, end_position, event_count, start_prev_hash,"
                " end_hash, algorithm, key_id, document, signature, created_at, sequence,"
                " prev_digest_sha256) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
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
                    sequence,
                    prev_digest,
                ],
            )
        digest = Digest.objects.get(sequence=sequence)
        # Inside the transaction: a digest the sink refused is not kept in the database either.
        destination.write(sink.entry_of(digest))
        return digest


def count() -> int:
    return Digest.objects.count()


def _row_matches(d: Any, doc: dict[str, Any]) -> bool:
    listed = (
        d.start_position,
        d.end_position,
        d.event_count,
        d.end_hash,
        d.start_prev_hash,
        d.algorithm,
        d.key_id,
        d.sequence,
        d.prev_digest_sha256 or None,
    )
    return listed == (
        doc.get("start_position"),
        doc.get("end_position"),
        doc.get("event_count", d.event_count),
        doc.get("end_hash"),
        doc.get("start_prev_hash"),
        doc.get("algorithm"),
        doc.get("key_id"),
        doc.get("sequence"),
        doc.get("prev_digest_sha256"),
    )


def check_digests(
    digests: Any,
    *,
    last_position: int,
    previous: Digest | None,
    first: bool = True,
    public_keys: dict[str, str] | None = None,
) -> ChainProblem | None:
    """Signatures, the digest chain and contiguity of ``digests`` (in order), after
    ``previous`` (None: they start the log when ``first``, else the first is taken as given).

    Does not compare end hashes with the stored events: see ``check_all``.
    """
    if public_keys is None:
        try:
            public_keys = trusted_public_keys()
        except KeyTrustError as exc:
            return ChainProblem(0, "key", f"untrusted digest key history: {exc}")
    prev = previous
    for d in digests:
        doc = json.loads(d.document)
        keys = public_keys if d.algorithm == signing.ED25519 else None
        if not verify_signature(d.algorithm, d.key_id, d.document, d.signature, keys):
            known = d.algorithm != signing.ED25519 or d.key_id in public_keys
            why = "a bad signature" if known else f"a signature by untrusted key {d.key_id!r}"
            return ChainProblem(d.end_position, "digest", f"digest {d.pk} has {why}")
        if not _row_matches(d, doc):
            return ChainProblem(
                d.end_position, "digest", f"digest {d.pk} row differs from its signed document"
            )
        if d.event_count != d.end_position - d.start_position + 1 or d.event_count < 0:
            return ChainProblem(d.end_position, "digest", f"digest {d.pk} miscounts its range")
        if prev is None and first:
            follows = d.start_position == 1 and d.start_prev_hash == GENESIS_HASH
            link_ok = d.sequence in (None, 1) and (
                d.sequence is None or d.prev_digest_sha256 == signing.GENESIS_DIGEST
            )
        elif prev is None:
            follows = link_ok = True
        else:
            follows = (
                d.start_position == prev.end_position + 1 and d.start_prev_hash == prev.end_hash
            )
            if d.sequence is None:
                link_ok = prev.sequence is None  # digests from before the chain come first
            else:
                link_ok = d.sequence == (prev.sequence or 0) + 1 and (
                    d.prev_digest_sha256 == signing.document_sha256(prev.document)
                )
        if not follows:
            return ChainProblem(
                d.start_position, "digest", f"digest {d.pk} does not follow the previous one"
            )
        if not link_ok:
            return ChainProblem(
                d.start_position,
                "digest",
                f"digest {d.pk} (number {d.sequence}) does not link to the digest before it: "
                "a digest was removed or inserted",
            )
        if d.end_position > last_position:
            return ChainProblem(
                last_position + 1,
                "missing",
                f"the log ends at {last_position} but digest {d.pk} signed events up to "
                f"{d.end_position}",
            )
        prev = d
    return None


def sink_continuity(last: Digest | None, newest: sink.SinkEntry | None) -> ChainProblem | None:
    """The sink's newest copy is a digest the database still holds, unchanged, and the database
    has every digest the sink has.

    The database may be ahead of this sink: another host signed since this host last copied
    (each host's sink is a witness of its own; the next signing here copies what it lacks).
    """
    if newest is None:
        return None  # a new (or newly configured) sink starts with the next digest
    have = last.sequence if last is not None and last.sequence is not None else 0
    if newest.sequence > have:
        return ChainProblem(
            (last.end_position + 1) if last else 1,
            "missing",
            f"the digest sink holds digests up to number {newest.sequence}, signing events up "
            f"to position {newest.doc.get('end_position')}, but the database's newest digest is "
            f"number {have}: the tail of the log was cut together with its digests",
        )
    held = (
        last
        if last is not None and newest.sequence == have
        else Digest.objects.filter(sequence=newest.sequence).first()
    )
    if held is None:
        return ChainProblem(
            int(newest.doc.get("start_position", 0)),
            "missing",
            f"digest number {newest.sequence} is in the digest sink but not in the database",
        )
    if (newest.document, newest.signature) != (held.document, held.signature):
        return ChainProblem(
            held.start_position,
            "digest",
            f"digest number {newest.sequence} differs from its copy in the digest sink: the "
            "database's digest was replaced",
        )
    return None


def _catch_up(destination: Any, newest: sink.SinkEntry | None, last: Digest | None) -> None:
    """Copy to this host's sink the digests other hosts signed since its newest copy, once they
    are checked (trusted signatures, linked to the copy)."""
    if newest is None or last is None or last.sequence is None or newest.sequence >= last.sequence:
        return
    anchor = Digest.objects.get(sequence=newest.sequence)
    missing = list(
        Digest.objects.filter(sequence__gt=newest.sequence, sequence__lte=last.sequence).order_by(
            "sequence"
        )
    )
    problem = check_digests(missing, last_position=last.end_position, previous=anchor)
    if problem is not None:
        raise ChainBroken(problem)
    for digest in missing:
        destination.write(sink.entry_of(digest))


def check_sink(copies: dict[int, Any] | None = None) -> ChainProblem | None:
    """Every digest against its copy in the sink, and the sink's newest against the database's."""
    if copies is None:
        try:
            copies = sink.configured().read()
        except sink.SinkError as exc:
            return ChainProblem(0, "digest", f"the digest sink cannot be read: {exc}")
    if copies is None:
        return None  # a sink that cannot be read back (syslog, a webhook)
    if not copies:
        return None
    problem = sink_continuity(last_digest(), copies[max(copies)])
    if problem is not None:
        return problem
    # Digests after the newest copy were signed elsewhere and are not copied here yet.
    rows = Digest.objects.filter(sequence__gte=min(copies), sequence__lte=max(copies)).values_list(
        "sequence", "document", "signature", "end_position"
    )
    seen: set[int] = set()
    for sequence, document, signature, end_position in rows.iterator():
        assert sequence is not None  # filtered on the sequence
        seen.add(sequence)
        copy = copies.get(sequence)
        if copy is None:
            return ChainProblem(
                end_position, "digest", f"digest number {sequence} is not in the digest sink"
            )
        if (copy.document, copy.signature) != (document, signature):
            return ChainProblem(
                end_position,
                "digest",
                f"digest number {sequence} differs from its copy in the digest sink",
            )
    lost = sorted(set(copies) - seen)
    if lost:
        doc = copies[lost[0]].doc
        return ChainProblem(
            int(doc.get("start_position", 0)),
            "missing",
            f"digest number {lost[0]} is in the digest sink but not in the database",
        )
    return None


def vouched_end() -> int:
    """The highest position a digest, in the database or in the sink, has signed."""
    last = last_digest()
    end = last.end_position if last else 0
    try:
        _, newest = sink.newest_of(sink.configured())
    except sink.SinkError:
        newest = None
    if newest is not None:
        end = max(end, int(newest.doc.get("end_position", 0)))
    return end


def _end_hash_problem(needed: dict[int, str]) -> ChainProblem | None:
    stored = dict(Event.objects.filter(position__in=list(needed)).values_list("position", "hash"))
    for position in sorted(needed):
        if stored.get(position) != needed[position]:
            return ChainProblem(
                position, "digest", "the event's hash differs from the signed digest"
            )
    return None


def check_all(last_position: int) -> ChainProblem | None:
    """Every digest: trusted key, valid signature, the digest chain, contiguous ranges, the
    copies in the sink, and matching hashes in the store.

    Streams the digests (a digest a minute is half a million a year) and compares their end
    hashes with the store a few thousand at a time.
    """
    problem = _key_problem()
    if problem is not None:
        return problem
    digests = Digest.objects.order_by("start_position", "end_position", "sequence").iterator(
        chunk_size=2000
    )
    needed: dict[int, str] = {}
    found: list[ChainProblem] = []

    def collect() -> Any:
        for d in digests:
            if d.end_position >= 1:
                needed[d.end_position] = d.end_hash
            if len(needed) >= 5000:
                hash_problem = _end_hash_problem(needed)
                needed.clear()
                if hash_problem is not None:
                    found.append(hash_problem)
                    return
            yield d

    problem = check_digests(collect(), last_position=last_position, previous=None)
    if problem is None and found:
        problem = found[0]
    if problem is None and needed:
        problem = _end_hash_problem(needed)
    if problem is None:
        problem = check_sink()
    return problem


def check_against_bundle(path: str) -> ChainProblem | None:
    """The log still holds every digest of an earlier evidence bundle, unchanged.

    The bundle's digests are checked with this host's trusted keys; a digest the database lacks
    (the log was cut back) or holds differently (cut back and signed again) is a problem.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            entries = json.loads(zf.read("digests.json"))
        copies = []
        for entry in entries:
            sequence = json.loads(entry["document"]).get("sequence")
            if sequence is not None:  # digests older than the chain are checked by their hash
                copies.append(sink.SinkEntry(int(sequence), entry["document"], entry["signature"]))
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as exc:
        return ChainProblem(0, "digest", f"the earlier bundle {path} cannot be read: {exc}")
    try:
        public_keys = trusted_public_keys()
    except KeyTrustError as exc:
        return ChainProblem(0, "key", f"untrusted digest key history: {exc}")
    for copy in copies:
        doc = copy.doc
        if not verify_signature(
            doc.get("algorithm", ""),
            doc.get("key_id", ""),
            copy.document,
            copy.signature,
            public_keys if doc.get("algorithm") == signing.ED25519 else None,
        ):
            return ChainProblem(
                int(doc.get("end_position", 0)),
                "digest",
                f"digest number {copy.sequence} of the earlier bundle is not validly signed by a "
                "key this host trusts",
            )
    if not copies:
        return None
    held = dict(
        Digest.objects.filter(sequence__in=[c.sequence for c in copies]).values_list(
            "sequence", "document"
        )
    )
    for copy in sorted(copies, key=lambda c: c.sequence):
        doc = copy.doc
        if copy.sequence not in held:
            return ChainProblem(
                int(doc.get("start_position", 0)),
                "missing",
                f"digest number {copy.sequence} of the earlier bundle (positions "
                f"{doc.get('start_position')}..{doc.get('end_position')}) is gone from the log: "
                "the log was cut back",
            )
        if held[copy.sequence] != copy.document:
            return ChainProblem(
                int(doc.get("start_position", 0)),
                "digest",
                f"digest number {copy.sequence} differs from the one in the earlier bundle: the "
                "log was cut back and signed again",
            )
    return None
