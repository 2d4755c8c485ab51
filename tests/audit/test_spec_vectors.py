"""The specification in docs/event-store.md is what the code computes.

The test vectors are read from the page itself, so a change to the hash that is not also made
to the page (or the other way round) fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from audit import offline, signing
from audit.hashing import (
    EVENT_COLUMNS,
    GENESIS_HASH,
    HASHED_FIELDS,
    event_hash,
    hash_input,
    render_fields,
)
from audit.verify import verify_rows

DOC = Path(__file__).resolve().parents[2] / "docs" / "event-store.md"


def vector_block(name: str) -> str:
    """The fenced block right after ``<!-- test-vectors: NAME -->`` on the page."""
    text = DOC.read_text(encoding="utf-8")
    match = re.search(
        rf"<!-- test-vectors: {re.escape(name)} -->\n```[a-z]*\n(.*?)\n```", text, re.DOTALL
    )
    assert match, f"docs/event-store.md has no test vector block {name!r}"
    return match.group(1)


def vector_events() -> list[dict]:
    return [json.loads(line) for line in vector_block("events").splitlines()]


def test_the_documented_hashes_are_what_the_code_computes() -> None:
    events = vector_events()
    assert len(events) >= 3
    prev_hash = GENESIS_HASH
    for position, event in enumerate(events, start=1):
        assert set(event) == set(EVENT_COLUMNS)
        assert (event["position"], event["prev_hash"]) == (position, prev_hash)
        assert event_hash(event, event["data"], event["prev_hash"]) == event["hash"]
        prev_hash = event["hash"]


def test_the_documented_hash_inputs_are_the_bytes_that_are_hashed() -> None:
    events = vector_events()
    for n in (1, 2):
        event = events[n - 1]
        documented = vector_block(f"hash-input {n}")
        assert hash_input(render_fields(event), event["data"], event["prev_hash"]) == (
            documented.encode()
        )


def test_the_documented_field_order_is_the_code_s() -> None:
    text = DOC.read_text(encoding="utf-8")
    listed = re.search(
        r"exactly these 16 values, in this order, each as a string:\n(.*?)\.\n", text, re.DOTALL
    )
    assert listed
    assert tuple(re.findall(r"`([a-z_]+)`", listed.group(1))) == HASHED_FIELDS


def test_both_verification_loops_accept_the_vectors_and_refuse_a_change() -> None:
    events = vector_events()
    rows = [
        (e["position"], e["prev_hash"], e["hash"], e["data"], *render_fields(e)) for e in events
    ]
    assert verify_rows(rows).checked == len(events)
    block = "".join(
        json.dumps(e, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n"
        for e in events
    ).encode()
    good, last_hash, problem = offline._check_block(block, 0, 1, GENESIS_HASH, {})
    assert (good, last_hash, problem) == (len(events), events[-1]["hash"], None)

    changed = [dict(e) for e in events]
    changed[1]["actor_name"] = changed[1]["actor_name"].replace("\t", " ")
    rows[1] = (*rows[1][:4], *render_fields(changed[1]))
    report = verify_rows(rows)
    assert (report.checked, report.problem and report.problem.kind) == (1, "altered")


def signature_vectors() -> dict:
    return json.loads(vector_block("signatures"))


def test_the_documented_key_statement_is_what_the_code_writes_and_signs() -> None:
    v = signature_vectors()
    key = signing.private_from_text(v["ed25519_seed"])
    assert signing.public_b64(key.public_key()) == v["public_key"]
    assert signing.fingerprint(v["public_key"]) == v["fingerprint"]
    entry = v["key_entry"]
    statement = signing.key_statement(
        key_id=entry["key_id"],
        public_key=entry["public_key"],
        created_at=json.loads(entry["statement"])["created_at"],
        signed_by=entry["signed_by"],
        previous_key_id="",
        previous_statement=None,
    )
    assert statement == entry["statement"]
    assert signing.sign(key, statement) == entry["signature"]  # Ed25519 is deterministic
    history = signing.check_key_history([entry], trust_first=True)
    assert (history.problems, history.trusted) == ([], {entry["key_id"]: v["public_key"]})


def test_the_documented_digests_are_what_the_code_writes_and_signs() -> None:
    from audit.digests import DigestDocument, verify_signature

    v = signature_vectors()
    key = signing.private_from_text(v["ed25519_seed"])
    first, idle = v["digests"]
    for digest in (first, idle):
        assert DigestDocument(**json.loads(digest["document"])).canonical() == digest["document"]
    assert signing.sign(key, first["document"]) == first["signature"]
    assert verify_signature(
        "ed25519",
        "ed25519-test",
        first["document"],
        first["signature"],
        {"ed25519-test": v["public_key"]},
    )
    assert verify_signature(
        "hmac-sha256",
        "hmac-test",
        idle["document"],
        idle["signature"],
        {"hmac-test": idle["hmac_secret"]},
    )
    first_doc, idle_doc = json.loads(first["document"]), json.loads(idle["document"])
    assert idle_doc["prev_digest_sha256"] == signing.document_sha256(first["document"])
    assert first_doc["end_hash"] == vector_events()[-1]["hash"]  # it signs the events above
    assert (first_doc["start_position"], first_doc["end_position"]) == (1, len(vector_events()))
