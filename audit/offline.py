"""Verify an evidence bundle offline, without the database, the server or Django settings.

    python -m audit.offline verify bundle.zip [--trust FINGERPRINT ...] [--hmac-key ID=SECRET]
                                              [--since-bundle EARLIER.zip] [--sink DIR] [--json]

Needs only this package (``audit.hashing`` for the chain hash, ``audit.signing`` for Ed25519,
both free of Django), ``cryptography`` and ``msgspec`` (which decodes and type-checks the event
lines in bulk). It checks, reporting every problem and naming the
line of ``events.jsonl`` where the chain first breaks:

1. the manifest's Ed25519 signature and the SHA-256 of every file it lists;
2. each digest's signature with the bundled public keys that may be trusted (below; or, for
   HMAC digests, a secret given with ``--hmac-key``), that the digests follow each other without
   gaps, each linking to the one before, and cover exactly the exported range;
3. every event line: exactly the stored fields, its hash recomputed from its content and the
   previous line's hash, its position the next one, and its hash equal to the signed end hash
   wherever a digest ends.

Key trust (``audit.signing.check_key_history``): ``keys.json`` is the server's key history,
oldest first. A key is trusted when you pinned its fingerprint (``--trust``), when an earlier
bundle trusted it (``--since-bundle``), when a trusted key signed its rotation statement, or,
with neither option, when it is the first key of the history (trust on first use: compare the
fingerprint printed with the one you obtained independently). A key that the history lists but
nothing vouches for (one written into the server's database) is refused, and so are digests
it signed.

Continuity: a digest names its sequence number and the SHA-256 of the previous digest's
document, so a removed digest is found. ``--since-bundle EARLIER.zip`` checks that this bundle
continues an earlier one: the same key history, the same digests where they overlap, and a
chain that reaches the earlier bundle's last digest (a log cut back behind it is found).
``--sink DIR`` checks the digests against a copy of the server's digest sink.

Anchors: without ``--trust``, ``--since-bundle`` or ``--sink`` nothing outside the bundle vouches
for it (an earlier bundle anchors only when it was itself verified against ``--trust`` or
``--sink``: the verdict says so when it was not), and anyone can make a bundle that is
consistent in itself (re-sign it with a key of their own under the same key id). Such a
verification finds no problem but does not say OK: its verdict is UNANCHORED, with an exit
status of its own.

Exit status: 0 verified against an anchor, 1 verification failed, 2 the bundle could not be read
at all, 3 unanchored (consistent in itself, but nothing outside the bundle vouched for it).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from audit import signing
from audit.hashing import EVENT_COLUMNS, GENESIS_HASH, HASHED_FIELDS, event_hash, hash_input
from audit.sink import FileSink, SinkError

__all__ = [
    "BUNDLE_FORMAT",
    "EVENT_FIELDS",
    "EXIT_STATUS",
    "Problem",
    "Result",
    "main",
    "verify_bundle",
]

BUNDLE_FORMAT = "microvm-sandbox-evidence-bundle"
# The command's exit status per verdict (2: the bundle could not be read at all).
EXIT_STATUS = {"verified": 0, "failed": 1, "unanchored": 3}
FORMAT_VERSION = 1
EVENTS_FILE = "events.jsonl"
DIGESTS_FILE = "digests.json"
KEYS_FILE = "keys.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_SIG_FILE = "manifest.sig"

EVENT_FIELDS = EVENT_COLUMNS  # exactly the stored columns, from the Django-free hashing module
_FIELD_SET = frozenset(EVENT_FIELDS)
_INT_FIELDS = ("position", "version", "schema_version")


@dataclass(frozen=True)
class Problem:
    """One thing wrong; ``line`` and ``position`` name the event line where there is one."""

    where: str  # manifest, file, keys, digest, events
    detail: str
    line: int | None = None
    position: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            at = f"{EVENTS_FILE} line {self.line}"
            if self.position is not None:
                at += f" (position {self.position})"
            return f"{at}: {self.detail}"
        return f"{self.where}: {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "line": self.line,
            "position": self.position,
            "detail": self.detail,
        }


@dataclass
class Result:
    """What a verification found."""

    events: int = 0
    first_position: int | None = None
    last_position: int | None = None
    digests: int = 0
    key_fingerprints: dict[str, str] = field(default_factory=dict)
    key_trust: dict[str, str] = field(default_factory=dict)  # key id -> why it is trusted
    problems: list[Problem] = field(default_factory=list)
    # Whether something outside the bundle vouched for it: pinned fingerprints, an earlier
    # bundle or a copy of the digest sink. Without one, a consistent bundle proves nothing.
    anchored: bool = False
    # Why an anchor that was given does not count (an earlier bundle that was itself unanchored).
    anchor_note: str = ""

    @property
    def ok(self) -> bool:
        """No problem found (by itself not a verdict: see ``verdict``)."""
        return not self.problems

    @property
    def verdict(self) -> str:
        if self.problems:
            return "failed"
        return "verified" if self.anchored else "unanchored"

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "anchored": self.anchored,
            "anchor_note": self.anchor_note,
            "verdict": self.verdict,
            "events": self.events,
            "first_position": self.first_position,
            "last_position": self.last_position,
            "digests": self.digests,
            "keys": self.key_fingerprints,
            "key_trust": self.key_trust,
            "problems": [p.as_dict() for p in self.problems],
        }


class _Unreadable(Exception):
    """The bundle is not a zip, or lacks its manifest: nothing can be verified."""


def _sha256_of(zf: zipfile.ZipFile, name: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with zf.open(name) as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _load_json(zf: zipfile.ZipFile, name: str, problems: list[Problem]) -> Any:
    try:
        return json.loads(zf.read(name))
    except KeyError:
        problems.append(Problem(name, "missing from the bundle"))
    except (ValueError, UnicodeDecodeError) as exc:
        problems.append(Problem(name, f"not valid JSON: {exc}"))
    return None


def _key_entries(raw: Any, problems: list[Problem]) -> list[dict[str, Any]]:
    """The well-formed Ed25519 entries of ``keys.json``, in history order."""
    if not isinstance(raw, dict) or not isinstance(raw.get("keys"), list):
        if raw is not None:
            problems.append(Problem(KEYS_FILE, 'expected {"keys": [...]}'))
        return []
    entries = []
    for entry in raw["keys"]:
        if not isinstance(entry, dict):
            problems.append(Problem(KEYS_FILE, f"not a key entry: {entry!r}"))
            continue
        key_id, public = entry.get("key_id"), entry.get("public_key")
        if entry.get("algorithm") != signing.ED25519:
            problems.append(Problem(KEYS_FILE, f"key {key_id!r}: algorithm is not ed25519"))
            continue
        try:
            signing.public_from_b64(str(public))
        except ValueError as exc:
            problems.append(Problem(KEYS_FILE, f"key {key_id!r}: {exc}"))
            continue
        entries.append(entry)
    return entries


def _load_keys(
    raw: Any,
    trusted: frozenset[str],
    result: Result,
    problems: list[Problem],
    anchors: dict[str, str] | None = None,
) -> dict[str, str]:
    """Key id to base64 public key, for the keys of the history that may be trusted.

    ``trusted``: pinned fingerprints; ``anchors``: keys an earlier bundle trusted. With
    neither, the history's first key is trusted on first use.
    """
    entries = _key_entries(raw, problems)
    for entry in entries:
        result.key_fingerprints[str(entry.get("key_id"))] = signing.fingerprint(
            str(entry["public_key"])
        )
    history = signing.check_key_history(
        entries,
        configured=anchors or {},
        pinned=trusted,
        trust_first=not trusted and not anchors,
    )
    problems.extend(Problem(KEYS_FILE, p) for p in history.problems)
    result.key_trust = dict(history.how)
    return {k: v for k, v in history.trusted.items() if k in result.key_fingerprints}


def _check_manifest_signature(
    zf: zipfile.ZipFile, manifest_bytes: bytes, keys: dict[str, str], problems: list[Problem]
) -> None:
    sig = _load_json(zf, MANIFEST_SIG_FILE, problems)
    if sig is None:
        return
    key_id = sig.get("key_id") if isinstance(sig, dict) else None
    if not isinstance(sig, dict) or sig.get("algorithm") != signing.ED25519:
        problems.append(Problem(MANIFEST_SIG_FILE, "not an Ed25519 signature record"))
    elif key_id not in keys:
        problems.append(Problem(MANIFEST_SIG_FILE, f"signed with unknown key {key_id!r}"))
    elif not signing.verify(keys[key_id], manifest_bytes, str(sig.get("signature", ""))):
        problems.append(Problem(MANIFEST_SIG_FILE, "the manifest's signature does not verify"))


@dataclass(frozen=True)
class _Digest:
    number: int  # 1-based, in the bundle's order
    start: int
    end: int
    start_prev_hash: str
    end_hash: str
    sequence: int | None = None  # the digest chain; None for digests older than the chain
    prev_digest_sha256: str = ""
    document: str = ""
    signature: str = ""


def _check_digests(
    raw: Any,
    keys: dict[str, str],
    hmac_keys: dict[str, str],
    problems: list[Problem],
) -> list[_Digest]:
    """Signature and self-consistency of each digest, then contiguity. Returns the good ones."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw:
        problems.append(Problem(DIGESTS_FILE, "no digests: nothing proves the events unchanged"))
        return []
    good: list[_Digest] = []
    for number, entry in enumerate(raw, start=1):
        label = f"digest {number}"
        try:
            document = str(entry["document"])
            doc = json.loads(document)
            algorithm, key_id, signature = doc["algorithm"], doc["key_id"], entry["signature"]
            digest = _Digest(
                number,
                int(doc["start_position"]),
                int(doc["end_position"]),
                str(doc["start_prev_hash"]),
                str(doc["end_hash"]),
                None if doc.get("sequence") is None else int(doc["sequence"]),
                str(doc.get("prev_digest_sha256") or ""),
                document,
                str(signature),
            )
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(Problem(DIGESTS_FILE, f"{label} is malformed: {exc}"))
            continue
        if algorithm == signing.ED25519:
            if key_id not in keys:
                problems.append(
                    Problem(
                        DIGESTS_FILE,
                        f"{label} is signed with key {key_id!r}, which is not bundled or not "
                        "trusted",
                    )
                )
                continue
            valid = signing.verify(keys[key_id], document, str(signature))
        elif algorithm == signing.HMAC_SHA256:
            if key_id not in hmac_keys:
                problems.append(
                    Problem(
                        DIGESTS_FILE,
                        f"{label} is HMAC-SHA256 ({key_id}): it verifies only with the server's "
                        f"secret; pass --hmac-key {key_id}=SECRET",
                    )
                )
                continue
            expected = hmac.new(hmac_keys[key_id].encode(), document.encode(), hashlib.sha256)
            valid = hmac.compare_digest(
                base64.b64encode(expected.digest()).decode(), str(signature)
            )
        else:
            problems.append(Problem(DIGESTS_FILE, f"{label}: unknown algorithm {algorithm!r}"))
            continue
        if not valid:
            problems.append(Problem(DIGESTS_FILE, f"{label} has a bad signature"))
            continue
        listed = (entry.get("start_position"), entry.get("end_position"), entry.get("end_hash"))
        if listed != (digest.start, digest.end, digest.end_hash):
            problems.append(
                Problem(DIGESTS_FILE, f"{label}: listed fields differ from its document")
            )
            continue
        good.append(digest)
    # An idle digest (no events) starts where the next busy one does: order by end too.
    good.sort(key=lambda d: (d.start, d.end, d.sequence or 0))
    for before, after in zip(good, good[1:], strict=False):
        if after.start != before.end + 1 or after.start_prev_hash != before.end_hash:
            problems.append(
                Problem(
                    DIGESTS_FILE,
                    f"digest {after.number} ({after.start}..{after.end}) does not follow digest "
                    f"{before.number} ({before.start}..{before.end})",
                )
            )
        elif after.sequence is not None and (
            after.sequence != (before.sequence or 0) + 1
            or after.prev_digest_sha256 != signing.document_sha256(before.document)
        ):
            problems.append(
                Problem(
                    DIGESTS_FILE,
                    f"digest {after.number} (number {after.sequence}) does not link to digest "
                    f"{before.number} (number {before.sequence}): a digest was removed or "
                    "inserted",
                )
            )
    return good


# One events.jsonl line, typed: the decoder refuses an unknown or missing field and a value of
# the wrong JSON type, in C. Field order: position, the link, the hash, data, then the hashed
# fields in header order, so that ``astuple(line)[4:]`` is the header's values.
_Line = msgspec.defstruct(
    "_Line",
    [("position", int), ("prev_hash", str), ("hash", str), ("data", str)]
    + [(name, int if name in _INT_FIELDS else str) for name in HASHED_FIELDS],
    forbid_unknown_fields=True,
)
_LINE_DECODER = msgspec.json.Decoder(_Line)
_VERSION = HASHED_FIELDS.index("version")
_SCHEMA_VERSION = HASHED_FIELDS.index("schema_version")
_CHUNK = 1 << 20


def _check_events(
    zf: zipfile.ZipFile,
    digests: Sequence[_Digest],
    manifest_range: dict[str, Any],
    result: Result,
    problems: list[Problem],
) -> str | None:
    """Walk events.jsonl; stop at the first broken line. Returns the file's SHA-256."""
    if EVENTS_FILE not in zf.namelist():
        problems.append(Problem(EVENTS_FILE, "missing from the bundle"))
        return None
    ends = {d.end: d for d in digests}
    # Where the walk starts and ends comes from the signed manifest, not from the digests that
    # verified: after a rejected first digest, line 1 would be taken for a later position.
    first_position = int(manifest_range.get("first_position") or 1)
    prev_hash = str(manifest_range.get("start_prev_hash") or GENESIS_HASH)
    last_signed = int(manifest_range.get("last_position") or 0) if digests else None
    expected = first_position
    sha = hashlib.sha256()
    line = 0  # lines checked so far
    broken = False
    rest = b""
    with zf.open(EVENTS_FILE) as fh:
        while True:
            chunk = fh.read(_CHUNK)
            sha.update(chunk)  # the whole file, also past a break, for the manifest check
            if broken:
                if not chunk:
                    break
                continue
            block = rest + chunk
            if chunk:  # whole lines only; the rest waits for the next chunk
                cut = block.rfind(b"\n") + 1
                block, rest = block[:cut], block[cut:]
            if block:
                good, prev_hash, problem = _check_block(block, line, expected, prev_hash, ends)
                line += good
                expected += good
                if problem is not None:
                    problems.append(problem)
                    broken = True
            if not chunk:
                break
    result.events = expected - first_position
    if result.events:
        result.first_position = first_position
        result.last_position = expected - 1
    if not broken and last_signed is not None and result.last_position != last_signed:
        at = result.events + 1
        problems.append(
            Problem(
                "events",
                f"the events end at position {result.last_position or first_position - 1} but "
                f"the signed digests cover up to {last_signed}: lines are missing at the end",
                line=at,
                position=(result.last_position or first_position - 1) + 1,
            )
        )
    return sha.hexdigest()


def _check_block(
    block: bytes, line: int, expected: int, prev_hash: str, ends: dict[int, _Digest]
) -> tuple[int, str, Problem | None]:
    """Check the lines of ``block`` (whole lines; ``line`` lines came before it).

    Returns how many lines are good, the last good hash and the problem that ends the walk.
    The loop checks what ``_check_line`` checks, in bulk; from the first line it cannot pass (or
    for a block it cannot decode) ``_check_line`` takes over and says what is wrong.
    """
    lines = block.count(b"\n") + (not block.endswith(b"\n"))
    try:
        decoded = _LINE_DECODER.decode_lines(block)
    except (msgspec.DecodeError, UnicodeDecodeError):
        decoded = None
    if decoded is None or len(decoded) != lines:  # decode_lines skips blank lines: count them
        return _check_lines_slowly(block.split(b"\n")[:lines], line, expected, prev_hash, ends)
    sha256 = hashlib.sha256
    astuple = msgspec.structs.astuple
    start = expected
    for event in decoded:
        row = astuple(event)
        parts = list(row[4:])
        parts[_VERSION] = str(parts[_VERSION])
        parts[_SCHEMA_VERSION] = str(parts[_SCHEMA_VERSION])
        position = row[0]
        if (
            position == expected
            and row[1] == prev_hash
            and sha256(hash_input(parts, row[3], prev_hash)).hexdigest() == row[2]
            and (position not in ends or ends[position].end_hash == row[2])
        ):
            prev_hash = row[2]
            expected += 1
            continue
        done = expected - start
        raws = block.split(b"\n")[done:lines]
        good, prev_hash, problem = _check_lines_slowly(raws, line + done, expected, prev_hash, ends)
        return done + good, prev_hash, problem
    return expected - start, prev_hash, None


def _check_lines_slowly(
    raws: list[bytes], line: int, expected: int, prev_hash: str, ends: dict[int, _Digest]
) -> tuple[int, str, Problem | None]:
    """``_check_line`` on each line: the diagnosing path."""
    for good, raw in enumerate(raws):
        problem = _check_line(line + good + 1, raw, expected + good, prev_hash, ends)
        if problem is not None:
            return good, prev_hash, problem
        prev_hash = json.loads(raw)["hash"]
    return len(raws), prev_hash, None


def _check_line(
    number: int, raw: bytes, expected: int, prev_hash: str, ends: dict[int, _Digest]
) -> Problem | None:
    try:
        fields = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return Problem("events", f"not a JSON object: {exc}", line=number)
    if not isinstance(fields, dict):
        return Problem("events", "not a JSON object", line=number)
    position = fields.get("position")
    if set(fields) != _FIELD_SET:
        extra = sorted(set(fields) - _FIELD_SET)
        lacking = sorted(_FIELD_SET - set(fields))
        return Problem(
            "events",
            f"fields differ from the stored ones (extra {extra}, missing {lacking})",
            line=number,
            position=position if isinstance(position, int) else None,
        )
    if not all(isinstance(fields[f], int) and not isinstance(fields[f], bool) for f in _INT_FIELDS):
        return Problem("events", "position, version and schema_version must be integers", number)
    if not isinstance(fields["data"], str):
        return Problem("events", "data must be the stored canonical JSON text", number, position)
    not_text = sorted(
        name
        for name in EVENT_FIELDS
        if name not in _INT_FIELDS and not isinstance(fields[name], str)
    )
    if not_text:
        return Problem("events", f"{', '.join(not_text)} must be strings", number, position)
    position = fields["position"]  # an int from here on (checked just above)
    try:
        altered = event_hash(fields, fields["data"], fields["prev_hash"]) != fields["hash"]
    except UnicodeEncodeError:  # a lone surrogate (\ud800) escaped in the JSON: not text
        return Problem("events", "a value is not valid Unicode text", number, position)
    if altered:
        return Problem(
            "events",
            "altered: the line's content does not match its hash",
            line=number,
            position=position,
        )
    if position != expected:
        kind = "missing" if position > expected else "reordered"
        why = (
            f"position {expected} is absent here (an event was removed or lines were reordered)"
            if kind == "missing"
            else f"position {position} comes after position {expected - 1} (lines reordered)"
        )
        return Problem("events", f"{kind}: {why}", line=number, position=position)
    if fields["prev_hash"] != prev_hash:
        return Problem(
            "events",
            "broken link: the line does not follow the previous line's hash "
            "(a line was removed, inserted, reordered or rewritten before it)",
            line=number,
            position=position,
        )
    digest = ends.get(position)
    if digest is not None and fields["hash"] != digest.end_hash:
        return Problem(
            "events",
            f"the hash differs from the one signed by digest {digest.number}",
            line=number,
            position=position,
        )
    return None


def _history_of(entries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(key id, statement) of the key history's entries, leaving out keys known from the
    server's configuration only (they are not part of the chain)."""
    return [
        (str(e.get("key_id")), str(e.get("statement") or ""))
        for e in entries
        if e.get("in_history") is not False
    ]


@dataclass
class _Earlier:
    """What an earlier bundle vouches for: its trusted keys, key history and digests; an anchor
    only when it was itself verified against one (``anchored``)."""

    path: str
    keys: dict[str, str]
    history: list[tuple[str, str]]  # (key id, statement), oldest first
    digests: dict[int, _Digest]  # by sequence number
    anchored: bool

    @classmethod
    def load(
        cls, path: str, trusted_fingerprints: Sequence[str], sink_dir: str | None = None
    ) -> _Earlier:
        result = verify_bundle(path, trusted_fingerprints=trusted_fingerprints, sink_dir=sink_dir)
        if not result.ok:
            raise _Unreadable(
                f"the earlier bundle {path} does not verify: "
                + "; ".join(str(p) for p in result.problems)
            )
        with zipfile.ZipFile(path) as zf:
            scratch: list[Problem] = []
            entries = _key_entries(_load_json(zf, KEYS_FILE, scratch), scratch)
            keys = _load_keys({"keys": entries}, frozenset(trusted_fingerprints), Result(), scratch)
            digests = _check_digests(_load_json(zf, DIGESTS_FILE, scratch), keys, {}, scratch)
        return cls(
            path,
            keys,
            _history_of(entries),
            {d.sequence: d for d in digests if d.sequence is not None},
            result.anchored,
        )

    def check(
        self, entries: list[dict[str, Any]], digests: Sequence[_Digest], problems: list[Problem]
    ) -> None:
        where = "since-bundle"
        history = _history_of(entries)
        if history[: len(self.history)] != self.history:
            problems.append(Problem(where, f"the key history differs from the one in {self.path}"))
        if not self.digests:
            return
        newest = max(self.digests)
        mine = {d.sequence: d for d in digests if d.sequence is not None}
        for sequence in sorted(set(mine) & set(self.digests)):
            if (mine[sequence].document, mine[sequence].signature) != (
                self.digests[sequence].document,
                self.digests[sequence].signature,
            ):
                old = self.digests[sequence]
                problems.append(
                    Problem(
                        where,
                        f"digest number {sequence} differs from the one in {self.path} (which "
                        f"signed positions {old.start}..{old.end}): the log was cut back or "
                        "rewritten after it was exported",
                    )
                )
                return
        if not mine:
            return
        if max(mine) < newest:
            old = self.digests[newest]
            problems.append(
                Problem(
                    where,
                    f"this bundle's digests end at number {max(mine)}, but {self.path} holds "
                    f"digest number {newest} (positions up to {old.end}): the log was cut back, "
                    "or this bundle does not reach the end of the earlier one",
                )
            )
        elif min(mine) > newest + 1:
            problems.append(
                Problem(
                    where,
                    f"digests {newest + 1}..{min(mine) - 1} are in neither bundle: continuity "
                    "cannot be checked",
                )
            )
        elif min(mine) == newest + 1 and mine[newest + 1].prev_digest_sha256 != (
            signing.document_sha256(self.digests[newest].document)
        ):
            problems.append(
                Problem(
                    where,
                    f"digest number {newest + 1} does not follow digest number {newest} of "
                    f"{self.path}",
                )
            )


def _check_against_sink(sink_dir: str, digests: Sequence[_Digest], problems: list[Problem]) -> int:
    """The bundle's digests are the ones copied to the sink when they were signed.

    Returns how many of them the sink holds the same (an anchor only if some)."""
    try:
        copies = FileSink(sink_dir).read()
    except SinkError as exc:
        problems.append(Problem("sink", str(exc)))
        return 0
    if not copies:
        problems.append(Problem("sink", f"{sink_dir} holds no digest copies"))
        return 0
    same = 0
    for d in digests:
        # Before the sink's first copy (made before the sink), or after its newest (signed on
        # another host since): nothing to compare with.
        if d.sequence is None or not min(copies) <= d.sequence <= max(copies):
            continue
        copy = copies.get(d.sequence)
        if copy is None:
            problems.append(Problem("sink", f"digest number {d.sequence} is not in the sink"))
        elif (copy.document, copy.signature) != (d.document, d.signature):
            problems.append(
                Problem(
                    "sink",
                    f"digest number {d.sequence} differs from its copy in the sink: the "
                    "server's log was cut back or rewritten",
                )
            )
        else:
            same += 1
    return same


def verify_bundle(
    path: str,
    *,
    trusted_fingerprints: Sequence[str] = (),
    hmac_keys: dict[str, str] | None = None,
    since_bundle: str | None = None,
    sink_dir: str | None = None,
) -> Result:
    """Verify the bundle at ``path``; raises ``_Unreadable`` when it cannot be read at all.

    ``since_bundle``: an earlier bundle this one must continue; ``sink_dir``: a copy of the
    server's digest sink the digests must agree with.
    """
    # A sink anchors only the digests it holds too (counted below); an earlier bundle only when
    # it was itself verified against an anchor (else anyone could make both).
    earlier = _Earlier.load(since_bundle, trusted_fingerprints, sink_dir) if since_bundle else None
    result = Result(anchored=bool(trusted_fingerprints or (earlier and earlier.anchored)))
    if earlier is not None and not earlier.anchored:
        result.anchor_note = (
            f"the earlier bundle {since_bundle} is itself unanchored (no --trust or --sink "
            "vouched for it), so it anchors nothing"
        )
    problems = result.problems
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise _Unreadable(f"{path}: not a readable zip file: {exc}") from exc
    with zf:
        try:
            manifest_bytes = zf.read(MANIFEST_FILE)
            manifest = json.loads(manifest_bytes)
        except KeyError as exc:
            raise _Unreadable(f"{path}: no {MANIFEST_FILE}: not an evidence bundle") from exc
        except ValueError as exc:
            raise _Unreadable(f"{path}: {MANIFEST_FILE} is not JSON: {exc}") from exc
        if manifest.get("format") != BUNDLE_FORMAT or manifest.get("format_version") != 1:
            problems.append(Problem(MANIFEST_FILE, "not a version 1 evidence bundle manifest"))
        trusted = frozenset(fp.lower() for fp in trusted_fingerprints)
        raw_keys = _load_json(zf, KEYS_FILE, problems)
        keys = _load_keys(
            raw_keys, trusted, result, problems, anchors=earlier.keys if earlier else None
        )
        _check_manifest_signature(zf, manifest_bytes, keys, problems)
        digests = _check_digests(
            _load_json(zf, DIGESTS_FILE, problems), keys, hmac_keys or {}, problems
        )
        result.digests = len(digests)
        if earlier is not None:
            earlier.check(_key_entries(raw_keys, []), digests, problems)
        if sink_dir is not None:
            if _check_against_sink(sink_dir, digests, problems):
                result.anchored = True
                result.anchor_note = ""
        manifest_range = manifest.get("range") or {}
        if digests and (
            digests[0].start != manifest_range.get("first_position")
            or digests[-1].end != manifest_range.get("last_position")
        ):
            problems.append(
                Problem(
                    DIGESTS_FILE,
                    f"the digests cover {digests[0].start}..{digests[-1].end}, not the exported "
                    f"range {manifest_range.get('first_position')}.."
                    f"{manifest_range.get('last_position')}",
                )
            )
        events_sha = _check_events(zf, digests, manifest_range, result, problems)

        files = manifest.get("files") or {}
        for name in sorted(set(zf.namelist()) - set(files) - {MANIFEST_FILE, MANIFEST_SIG_FILE}):
            problems.append(Problem("files", f"{name} is in the bundle but not in the manifest"))
        for name, meta in sorted(files.items()):
            if name not in zf.namelist():
                problems.append(Problem("files", f"{name} is listed in the manifest but absent"))
                continue
            actual = events_sha if name == EVENTS_FILE else _sha256_of(zf, name)[0]
            if actual != meta.get("sha256"):
                problems.append(Problem("files", f"{name}: SHA-256 differs from the manifest"))
        if EVENTS_FILE not in files:
            problems.append(Problem("files", f"{EVENTS_FILE} is not listed in the manifest"))
    return result


def _parse_hmac_keys(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key_id, sep, secret = item.partition("=")
        if not sep:
            raise SystemExit(f"--hmac-key expects ID=SECRET, got {item!r}")
        out[key_id] = secret
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m audit.offline", description="Verify an audit evidence bundle offline."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="verify a bundle (.zip)")
    verify.add_argument("bundle")
    verify.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="FINGERPRINT",
        help="SHA-256 fingerprint of a public key you obtained independently (repeatable)",
    )
    verify.add_argument(
        "--hmac-key",
        action="append",
        default=[],
        metavar="ID=SECRET",
        help="secret for HMAC-SHA256 digests (older digests; repeatable)",
    )
    verify.add_argument(
        "--since-bundle",
        metavar="EARLIER.zip",
        help="an earlier bundle: check that this one continues it (keys, digests, no cut)",
    )
    verify.add_argument(
        "--sink", metavar="DIR", help="a copy of the server's digest sink to check against"
    )
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)

    try:
        result = verify_bundle(
            args.bundle,
            trusted_fingerprints=args.trust,
            hmac_keys=_parse_hmac_keys(args.hmac_key),
            since_bundle=args.since_bundle,
            sink_dir=args.sink,
        )
    except _Unreadable as exc:
        print(f"UNREADABLE: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    elif result.ok:
        keys = ", ".join(
            f"{k} {fp} ({result.key_trust.get(k, 'untrusted')})"
            for k, fp in sorted(result.key_fingerprints.items())
        )
        summary = (
            f"{result.events} events, positions {result.first_position}.."
            f"{result.last_position}, chain intact; {result.digests} signed digests valid; "
            f"keys: {keys or 'none'}"
        )
        if result.anchored:
            print(f"OK: {summary}")
        elif result.anchor_note:
            print(
                f"UNANCHORED: the chain is internally consistent but {result.anchor_note}: "
                f"anyone can make a bundle like this one; {summary}"
            )
        else:
            print(
                "UNANCHORED: the chain is internally consistent but no trust anchor was given "
                "(--trust FINGERPRINT, --since-bundle EARLIER.zip or --sink DIR): anyone can "
                f"make a bundle like this one; {summary}"
            )
    else:
        for problem in result.problems:
            print(f"FAILED: {problem}", file=sys.stderr)
        print(
            f"{result.events} events verified before the first problem; "
            f"{len(result.problems)} problem(s)",
            file=sys.stderr,
        )
    return EXIT_STATUS[result.verdict]


if __name__ == "__main__":
    sys.exit(main())
