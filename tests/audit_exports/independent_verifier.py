"""An evidence bundle verifier written from docs/event-store.md alone.

It imports nothing of the project (only the standard library and ``cryptography`` for Ed25519),
as an auditor's own tool would: the tests hold it to agree with ``audit.offline``, so the page
says everything needed to verify a bundle. Sections it follows: "The chain hash, exactly" and
"Signatures and bundles, exactly".

``verify(path, pinned=(), hmac_secrets=None)`` returns a ``Verdict``: ``ok``, the problems, and
the line of ``events.jsonl`` where the chain first breaks (None when it does not).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

ZEROS = "0" * 64
HEADER_FIELDS = [
    "event_id", "aggregate_type", "aggregate_id", "version", "type", "schema_version",
    "actor_type", "actor_id", "actor_name", "token_id", "channel", "source_ip", "request_id",
    "correlation_id", "causation_id", "recorded_at",
]  # fmt: skip
LINE_FIELDS = {"position", "prev_hash", "hash", "data", *HEADER_FIELDS}
INTEGER_FIELDS = {"position", "version", "schema_version"}


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    broken_line: int | None = None
    events: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_hex(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def ed25519_ok(public_b64: str, message: str | bytes, signature_b64: str) -> bool:
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_b64, validate=True))
        key.verify(
            base64.b64decode(signature_b64, validate=True),
            message.encode() if isinstance(message, str) else message,
        )
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def fingerprint(public_b64: str) -> str:
    return hashlib.sha256(base64.b64decode(public_b64)).hexdigest()


# --- the chain hash ------------------------------------------------------------------------------


def escape(value: str) -> str:
    """A JSON string as the page says: only quote, backslash and controls escaped."""
    short = {
        '"': '\\"',
        "\\": "\\\\",
        "\b": "\\b",
        "\t": "\\t",
        "\n": "\\n",
        "\f": "\\f",
        "\r": "\\r",
    }
    out = []
    for ch in value:
        if ch in short:
            out.append(short[ch])
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def event_hash(line: dict[str, Any]) -> str:
    header = "[" + ",".join(escape(str(line[name])) for name in HEADER_FIELDS) + "]"
    return sha256_hex(f"{line['prev_hash']}\n{header}\n{line['data']}")


# --- keys and digests ----------------------------------------------------------------------------


def trusted_keys(raw: Any, pinned: set[str], problems: list[str]) -> dict[str, str]:
    entries = raw.get("keys") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        problems.append("keys.json: not a key list")
        return {}
    trusted: dict[str, str] = {}
    previous: dict[str, Any] | None = None
    first = True
    for entry in entries:
        key_id, public = str(entry.get("key_id")), str(entry.get("public_key"))
        if entry.get("in_history") is False:
            if fingerprint(public) in pinned:
                trusted[key_id] = public
            continue
        statement, signed_by = str(entry.get("statement") or ""), str(entry.get("signed_by") or "")
        signature = str(entry.get("signature") or "")
        vouched = fingerprint(public) in pinned
        if statement:
            expected = canonical(
                {
                    "type": "digest-key",
                    "key_id": key_id,
                    "algorithm": "ed25519",
                    "public_key": public,
                    "fingerprint": fingerprint(public),
                    "created_at": json.loads(statement).get("created_at", ""),
                    "signed_by": signed_by,
                    "previous_key_id": str(previous["key_id"]) if previous else "",
                    "previous_statement_sha256": sha256_hex(str(previous.get("statement") or ""))
                    if previous
                    else ZEROS,
                }
            )
            signer = public if signed_by == key_id else trusted.get(signed_by)
            if (
                statement != expected
                or signer is None
                or not ed25519_ok(signer, statement, signature)
            ):
                if not vouched:
                    problems.append(f"keys.json: key {key_id} has a bad or unvouched statement")
                    previous, first = entry, False
                    continue
            elif signed_by != key_id:
                vouched = True  # a rotation by a key trusted earlier
        if not vouched and first and not pinned and (not statement or signed_by == key_id):
            vouched = True  # trust on first use
        if vouched:
            trusted[key_id] = public
        else:
            problems.append(f"keys.json: key {key_id} is not trusted")
        previous, first = entry, False
    return trusted


def check_digests(
    raw: Any, keys: dict[str, str], secrets: dict[str, str], problems: list[str]
) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        problems.append("digests.json: no digests")
        return []
    good = []
    for entry in raw:
        document = entry["document"]
        doc = json.loads(document)
        if doc["algorithm"] == "ed25519":
            valid = doc["key_id"] in keys and ed25519_ok(
                keys[doc["key_id"]], document, entry["signature"]
            )
        elif doc["algorithm"] == "hmac-sha256" and doc["key_id"] in secrets:
            mac = hmac.new(secrets[doc["key_id"]].encode(), document.encode(), hashlib.sha256)
            valid = hmac.compare_digest(base64.b64encode(mac.digest()).decode(), entry["signature"])
        else:
            valid = False
        copies = (entry.get("start_position"), entry.get("end_position"), entry.get("end_hash"))
        if not valid or copies != (doc["start_position"], doc["end_position"], doc["end_hash"]):
            problems.append(f"digests.json: digest {doc.get('sequence')} does not verify")
            continue
        good.append({**doc, "_document": document})
    good.sort(key=lambda d: (d["start_position"], d["end_position"], d.get("sequence") or 0))
    for before, after in zip(good, good[1:], strict=False):
        follows = (
            after["start_position"] == before["end_position"] + 1
            and after["start_prev_hash"] == before["end_hash"]
        )
        linked = after.get("sequence") is None or (
            after["sequence"] == (before.get("sequence") or 0) + 1
            and after["prev_digest_sha256"] == sha256_hex(before["_document"])
        )
        if not (follows and linked):
            problems.append(f"digests.json: digest {after.get('sequence')} does not follow")
    return good


# --- the bundle ----------------------------------------------------------------------------------


def check_line(raw: bytes, expected: int, prev_hash: str) -> tuple[dict[str, Any] | None, str]:
    try:
        line = json.loads(raw)
        if not isinstance(line, dict) or set(line) != LINE_FIELDS:
            return None, "not an event line"
        for name in LINE_FIELDS:
            is_int = type(line[name]) is int
            if (name in INTEGER_FIELDS) != is_int or (not is_int and type(line[name]) is not str):
                return None, f"{name} has the wrong type"
        if event_hash(line) != line["hash"]:
            return None, "altered"
    except (ValueError, UnicodeError):
        return None, "not valid JSON text"
    if line["position"] != expected:
        return None, "position out of order"
    if line["prev_hash"] != prev_hash:
        return None, "broken link"
    return line, ""


def verify(
    path: str, pinned: Iterable[str] = (), hmac_secrets: dict[str, str] | None = None
) -> Verdict:
    verdict = Verdict()
    problems = verdict.problems
    with zipfile.ZipFile(path) as zf:
        manifest_bytes = zf.read("manifest.json")
        manifest = json.loads(manifest_bytes)
        if (manifest.get("format"), manifest.get("format_version")) != (
            "microvm-sandbox-evidence-bundle",
            1,
        ):
            problems.append("manifest.json: not a version 1 evidence bundle")
        keys = trusted_keys(json.loads(zf.read("keys.json")), set(pinned), problems)
        sig = json.loads(zf.read("manifest.sig"))
        if sig.get("algorithm") != "ed25519" or not ed25519_ok(
            keys.get(sig.get("key_id"), ""), manifest_bytes, sig.get("signature", "")
        ):
            problems.append("manifest.sig: does not verify with a trusted key")
        files = manifest.get("files") or {}
        members = set(zf.namelist()) - {"manifest.json", "manifest.sig"}
        if members != set(files) or "events.jsonl" not in files:
            problems.append("manifest.json: the files listed are not the bundle's")
        for name in sorted(members & set(files)):
            if sha256_hex(zf.read(name)) != files[name].get("sha256"):
                problems.append(f"{name}: SHA-256 differs from the manifest")
        digests = check_digests(
            json.loads(zf.read("digests.json")), keys, hmac_secrets or {}, problems
        )
        if not digests:
            return verdict
        span = manifest.get("range") or {}
        if (digests[0]["start_position"], digests[-1]["end_position"]) != (
            span.get("first_position"),
            span.get("last_position"),
        ):
            problems.append("digests.json: the digests do not cover the exported range")
        ends = {d["end_position"]: d["end_hash"] for d in digests}
        expected, prev_hash = span.get("first_position"), span.get("start_prev_hash")
        number = 0
        for number, raw in enumerate(zf.read("events.jsonl").split(b"\n")[:-1], start=1):
            line, why = check_line(raw, expected, prev_hash)
            if line is None or ends.get(expected, line["hash"]) != line["hash"]:
                problems.append(f"events.jsonl line {number}: {why or 'differs from its digest'}")
                verdict.broken_line = number
                return verdict
            expected, prev_hash = expected + 1, line["hash"]
            verdict.events += 1
        if expected - 1 != span.get("last_position"):
            problems.append("events.jsonl: the lines end before the exported range does")
            verdict.broken_line = number + 1
    return verdict
