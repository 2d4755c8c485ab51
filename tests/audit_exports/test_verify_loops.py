"""The fast verification loops check exactly what the line-by-line checks do.

The offline verifier decodes and checks ``events.jsonl`` a block at a time and hands the first
line it cannot pass to the diagnosing path; the online verifier reads the hashed fields as
PostgreSQL renders them as text. These tests hold both to the reference (``audit.hashing``).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from django.db import connection, transaction

from audit import integrity, offline, store, verify
from audit.hashing import format_time, render_fields
from audit.offline import verify_bundle
from tests.audit.helpers import ACTOR
from tests.audit_exports.helpers import edit_lines, make_bundle
from tests.audit_exports.mix import Mix

pytestmark = pytest.mark.django_db

# Chunk sizes that split lines across reads in every way, down to a few bytes, and one that
# holds the whole file.
CHUNKS = (7, 300, 4096, 1 << 20)


@pytest.fixture
def bundle_path(mix: Mix, tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundle.zip")


def _dump(event: dict) -> bytes:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _results(path: Path, monkeypatch: pytest.MonkeyPatch) -> set[tuple]:
    seen = set()
    for size in CHUNKS:
        monkeypatch.setattr(offline, "_CHUNK", size)
        result = verify_bundle(str(path))
        seen.add((result.events, result.last_position, tuple(map(str, result.problems))))
    return seen


def test_every_chunk_size_verifies_the_same(
    bundle_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [(events, last, problems)] = _results(bundle_path, monkeypatch)
    assert problems == () and events == last > 10


@pytest.mark.parametrize("line", [0, 5, -1])
def test_a_changed_line_is_named_whatever_the_chunk_size(
    bundle_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: int
) -> None:
    def change(lines: list[bytes]) -> list[bytes]:
        event = json.loads(lines[line])
        event["actor_name"] = "mallory"
        lines[line] = _dump(event) + b"\n"
        return lines

    path = edit_lines(bundle_path, tmp_path / "changed.zip", change)
    [(events, _last, problems)] = _results(path, monkeypatch)
    number = line + 1 if line >= 0 else events + 1
    assert f"line {number} (position {number}): altered" in problems[0], problems
    assert events == number - 1


def test_a_blank_line_is_named(
    bundle_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bulk decoder skips blank lines; the verifier must not."""
    path = edit_lines(bundle_path, tmp_path / "blank.zip", lambda ls: ls[:3] + [b"\n"] + ls[3:])
    [(events, _last, problems)] = _results(path, monkeypatch)
    assert events == 3 and "line 4: not a JSON object" in problems[0], problems


def test_a_lone_surrogate_is_a_problem_not_a_crash(bundle_path: Path, tmp_path: Path) -> None:
    """JSON may escape half of a surrogate pair (\\ud800), which no UTF-8 text can hold: the
    verifier used to die on it with UnicodeEncodeError instead of naming the line."""

    def change(lines: list[bytes]) -> list[bytes]:
        lines[2] = lines[2].replace(b'"actor_name":"', b'"actor_name":"\\ud800', 1)
        return lines

    problems = [
        str(p)
        for p in verify_bundle(str(edit_lines(bundle_path, tmp_path / "s.zip", change))).problems
    ]
    assert any("line 3 (position 3): a value is not valid Unicode text" in p for p in problems)


def test_a_number_where_text_belongs_is_refused(bundle_path: Path, tmp_path: Path) -> None:
    """Every field but position, version and schema_version is a string in a bundle."""

    def change(lines: list[bytes]) -> list[bytes]:
        event = json.loads(lines[1])
        event["schema_version"] = str(event["schema_version"])
        lines[1] = _dump(event) + b"\n"
        return lines

    problems = [
        str(p)
        for p in verify_bundle(str(edit_lines(bundle_path, tmp_path / "n.zip", change))).problems
    ]
    assert any("line 2" in p and "must be integers" in p for p in problems), problems


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),  # no microseconds: still six digits
        datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2024, 2, 29, 0, 0, 0, 1, tzinfo=UTC),
    ],
)
def test_postgresql_renders_the_time_as_the_hash_does(
    postgres_only: None, moment: datetime
) -> None:
    expression = verify._PG_TEXT["recorded_at"].replace("recorded_at", "%s::timestamptz")
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute("SET LOCAL TIME ZONE 'America/St_Johns'")  # a session zone that is not UTC
        cur.execute(f"SELECT {expression}", [moment])  # noqa: S608
        assert cur.fetchone()[0] == format_time(moment)


def test_postgresql_rows_are_the_reference_rendering(postgres_only: None) -> None:
    store.append_many(
        [
            store.PendingEvent("user", "ü-1", "user.role_changed", {"name": 'é"\\\n\u2028😀'}),
            store.PendingEvent("user", "ü-1", "user.role_changed", {"i": 1}),
        ],
        actor=ACTOR,
    )
    events = [e for batch in store.iter_events(0) for e in batch]
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute("SET LOCAL TIME ZONE 'Asia/Kolkata'")
        rows = list(verify.pg_rows(0, 1))
        assert verify.verify_rows(iter(rows)).checked == len(events)
    for row, event in zip(rows, events, strict=True):
        fields = event.hashed_fields()
        assert row[:4] == (fields["position"], fields["prev_hash"], fields["hash"], fields["data"])
        assert list(row[4:]) == render_fields(fields)


@pytest.mark.django_db(transaction=True)
def test_the_streamed_walk_stops_cleanly_and_names_a_reordered_row(postgres_only, tamper) -> None:
    """Outside a transaction the rows stream; stopping at a bad row cancels the query, and the
    diagnosis (which queries the same connection) still works."""
    store.append_many(
        [store.PendingEvent("user", "9", "user.role_changed", {"i": i}) for i in range(3000)],
        actor=ACTOR,
    )
    with tamper(), connection.cursor() as cur:
        cur.execute("UPDATE audit_event SET position = -1 WHERE position = 30")
        cur.execute("UPDATE audit_event SET position = 30 WHERE position = 31")
        cur.execute("UPDATE audit_event SET position = 31 WHERE position = -1")
    assert not connection.in_atomic_block
    report = integrity.verify_store(batch=100)
    assert report.problem is not None and report.problem.kind == "reordered", report.problem
    assert report.problem.position == 30 and report.checked == 29
    with connection.cursor() as cur:  # the connection is usable: the stream was cancelled
        cur.execute("SELECT count(*) FROM audit_event")
        assert cur.fetchone()[0] == 3000
