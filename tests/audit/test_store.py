"""Appends: positions, versions, optimistic concurrency, hashes and provenance."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection, connections, transaction

from audit import store
from audit.actor import Actor
from audit.errors import ConcurrencyError, InvalidEvent
from audit.hashing import GENESIS_HASH
from audit.integrity import verify_store
from audit.models import Event
from tests.audit.helpers import ACTOR, append_user_events


@pytest.mark.django_db
def test_positions_versions_and_links() -> None:
    a = append_user_events("1", 2)
    b = store.append(
        "user", "2", "user.created", {"username": "b"}, actor=ACTOR, expected_version=0
    )
    assert [e.position for e in a + [b]] == [1, 2, 3]
    assert [e.version for e in a] == [1, 2]
    assert b.version == 1
    assert a[0].prev_hash == GENESIS_HASH
    assert a[1].prev_hash == a[0].hash and b.prev_hash == a[1].hash
    stored = Event.objects.get(position=3)
    assert stored.hash == b.hash and stored.payload == {"username": "b"}


@pytest.mark.django_db
def test_stale_expected_version_is_a_conflict_and_appends_nothing() -> None:
    append_user_events("7", 2)
    # A conflict aborts the caller's whole transaction (the command changes nothing).
    with pytest.raises(ConcurrencyError) as info, transaction.atomic():
        store.append("user", "7", "user.deactivated", {}, actor=ACTOR, expected_version=1)
    assert (info.value.expected_version, info.value.current_version) == (1, 2)
    assert Event.objects.count() == 2


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("kind", "data", "message"),
    [
        ("no.such_type", {}, "unknown event type"),
        ("user.created", {"x": float("nan")}, "not valid JSON"),
        ("user.created", {"x": "a\x00b"}, "NUL"),
        ("user.created", {"x": object()}, "not JSON"),
    ],
)
def test_invalid_events_are_refused(kind: str, data: dict, message: str) -> None:
    with pytest.raises(InvalidEvent, match=message), transaction.atomic():
        store.append("user", "1", kind, data, actor=ACTOR)
    assert Event.objects.count() == 0


@pytest.mark.django_db
def test_event_carries_provenance() -> None:
    from core import context

    with context.bind(request_id="req-12345678", channel="api", source_ip="10.9.8.7"):
        actor = Actor(
            kind="user",
            user_id=5,
            username="ann",
            token_id="abcdefabcdef",
            channel="api",
            source_ip="10.9.8.7",
            request_id="req-12345678",
        )
        e = store.append("user", "5", "user.role_changed", {"to": "viewer"}, actor=actor)
    row = Event.objects.get(position=e.position)
    assert (row.actor_type, row.actor_id, row.actor_name, row.token_id) == (
        "user",
        "5",
        "ann",
        "abcdefabcdef",
    )
    assert (row.channel, row.source_ip, row.request_id, row.correlation_id) == (
        "api",
        "10.9.8.7",
        "req-12345678",
        "req-12345678",
    )


def _run_threads(target, n: int) -> list[BaseException | None]:
    errors: list[BaseException | None] = [None] * n

    def wrap(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors[i] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "writer thread hung"
    return errors


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_writers_on_one_aggregate_exactly_one_wins() -> None:
    store.append("user", "99", "user.created", {"username": "x"}, actor=ACTOR, expected_version=0)
    barrier = threading.Barrier(2)

    def writer(i: int) -> None:
        seen = store.aggregate_version("user", "99")  # both read version 1
        barrier.wait(timeout=10)
        store.append(
            "user", "99", "user.role_changed", {"writer": i}, actor=ACTOR, expected_version=seen
        )

    errors = _run_threads(writer, 2)
    conflicts = [e for e in errors if isinstance(e, ConcurrencyError)]
    assert len(conflicts) == 1, errors
    assert [e for e in errors if e is not None and not isinstance(e, ConcurrencyError)] == []
    assert conflicts[0].current_version == 2
    assert list(Event.objects.filter(aggregate_id="99").values_list("version", flat=True)) == [1, 2]


@pytest.mark.django_db(transaction=True)
def test_eight_writers_for_seconds_keep_positions_gap_free_and_chain_valid() -> None:
    deadline = time.monotonic() + 3.0
    counts = [0] * 8

    def writer(i: int) -> None:
        version = 0
        while time.monotonic() < deadline:
            store.append(
                "user",
                f"w{i}",
                "user.role_changed",
                {"n": version},
                actor=ACTOR,
                expected_version=version,
            )
            version += 1
            counts[i] = version

    errors = _run_threads(writer, 8)
    assert errors == [None] * 8
    positions = list(Event.objects.order_by("position").values_list("position", flat=True))
    assert positions == list(range(1, sum(counts) + 1))
    assert all(c > 0 for c in counts)
    report = verify_store()
    assert report.ok, report.problem
    assert report.checked == sum(counts)
    # Per-aggregate versions are dense too.
    for i in range(8):
        versions = list(
            Event.objects.filter(aggregate_id=f"w{i}")
            .order_by("version")
            .values_list("version", flat=True)
        )
        assert versions == list(range(1, counts[i] + 1))
    assert connection.vendor in {"postgresql", "sqlite"}
