"""The statements of the event store's hot paths, pinned by count (see ``querycount``)."""

from __future__ import annotations

import pytest
from django.db import connection, transaction

from accounts.models import LoginState
from audit import events, store
from audit.actor import Actor

from .querycount import exact_queries

pytestmark = pytest.mark.django_db

ACTOR = Actor.system(channel="system", name="test")


def _failed_login(username: str) -> store.RecordedEvent:
    with transaction.atomic():  # a command's transaction
        return store.append(
            "account", username, "auth.login_failed", {"reason": "bad_credentials"}, actor=ACTOR
        )


def test_an_append_runs_the_head_read_and_the_insert() -> None:
    with exact_queries(2) as sql:
        with transaction.atomic():
            store.append("user", "u1", "user.role_changed", {"role": "operator"}, actor=ACTOR)
    assert sql[0].startswith("SELECT") and sql[1].startswith("INSERT")


def test_an_append_with_an_inline_projection_reads_and_writes_its_row_once() -> None:
    """What bench/event_store.py times as a command: the append, then the login state read,
    written with one plain UPDATE (no CASE WHEN), and the projection's checkpoint."""
    _failed_login("alice")
    with exact_queries(5) as sql:
        _failed_login("alice")
    assert [s.split()[0] for s in sql] == ["SELECT", "INSERT", "SELECT", "UPDATE", "UPDATE"]
    assert "CASE" not in sql[3]
    state = LoginState.objects.get(username="alice")
    assert state.failure_count == 2 and len(state.recent_failures) == 2


COUNTING_LOCK = (
    f"SELECT pg_advisory_xact_lock({store.APPEND_LOCK_KEY}), set_config('sandbox.locks', "
    "(COALESCE(NULLIF(current_setting('sandbox.locks', true), ''), '0')::int + 1)::text, true)"
)


def _locks_taken() -> int:
    with connection.cursor() as cur:
        cur.execute("SELECT COALESCE(NULLIF(current_setting('sandbox.locks', true), ''), '0')")
        return int(cur.fetchone()[0])


def _advisory_locks_held() -> int:
    with connection.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND pid = pg_backend_pid() AND granted"
        )
        return cur.fetchone()[0]


def test_a_command_that_took_the_append_lock_does_not_take_it_again(
    postgres_only: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "LOCK_SQL", COUNTING_LOCK)
    with transaction.atomic():
        store.lock()  # as commands do, before reading the projections they check
        store.append("user", "u2", "user.role_changed", {"role": "viewer"}, actor=ACTOR)
        store.append("user", "u3", "user.role_changed", {"role": "viewer"}, actor=ACTOR)
        assert _locks_taken() == 1


def test_a_lock_taken_in_a_rolled_back_savepoint_is_taken_again(
    postgres_only: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL releases a lock taken after a savepoint when rolling back to it: the next
    append must lock again, or it would run unserialized."""
    monkeypatch.setattr(events, "LOCK_SQL", COUNTING_LOCK)
    with transaction.atomic():
        held_before = _advisory_locks_held()
        with pytest.raises(ZeroDivisionError), transaction.atomic():
            store.lock()
            assert _advisory_locks_held() == held_before + 1
            1 / 0  # noqa: B018
        assert _advisory_locks_held() == held_before
        store.append("user", "u4", "user.role_changed", {"role": "viewer"}, actor=ACTOR)
        assert _advisory_locks_held() == held_before + 1
