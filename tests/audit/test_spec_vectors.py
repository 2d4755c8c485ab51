"""The specification in docs/event-store.md is what the code computes.

The test vectors are read from the page itself, so a change to the hash that is not also made
to the page (or the other way round) fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from audit import offline
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
