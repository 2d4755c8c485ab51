"""The event table is append-only, enforced by the database itself."""

from __future__ import annotations

import contextlib

import pytest
from django.db import DatabaseError, connection, transaction

from tests.audit.helpers import append_user_events
from tests.conftest import acting_as_owner

pytestmark = pytest.mark.django_db


@pytest.fixture
def some_events() -> None:
    append_user_events("42", 3)


def _raw(sql: str) -> None:
    """As the schema owner: the triggers refuse even the owner (the product's own role is
    refused sooner, by its privileges: test_db_roles.py)."""
    with acting_as_owner(), transaction.atomic(), connection.cursor() as cur:
        cur.execute(sql)


def _count() -> int:
    with connection.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM audit_event")
        return cur.fetchone()[0]


def test_raw_update_is_refused(some_events: None) -> None:
    with pytest.raises(DatabaseError, match="append-only"):
        _raw("UPDATE audit_event SET type = 'forged' WHERE position = 2")
    with connection.cursor() as cur:
        cur.execute("SELECT type FROM audit_event WHERE position = 2")
        assert cur.fetchone()[0] == "user.role_changed"


def test_raw_delete_is_refused(some_events: None) -> None:
    with pytest.raises(DatabaseError, match="append-only"):
        _raw("DELETE FROM audit_event WHERE position = 1")
    with pytest.raises(DatabaseError, match="append-only"):
        _raw("DELETE FROM audit_event")
    assert _count() == 3


def test_raw_truncate_is_refused(some_events: None, postgres_only: None) -> None:
    with pytest.raises(DatabaseError, match="append-only"):
        _raw("TRUNCATE audit_event")
    with pytest.raises(DatabaseError, match="append-only"):
        _raw("TRUNCATE audit_event CASCADE")
    assert _count() == 3


def test_digests_are_append_only_too(some_events: None) -> None:
    from audit import digests

    digests.sign_pending()
    with pytest.raises(DatabaseError, match="append-only"):
        _raw("UPDATE audit_digest SET signature = 'x'")
    with pytest.raises(DatabaseError, match="append-only"):
        _raw("DELETE FROM audit_digest")


def test_orm_update_and_delete_are_refused(some_events: None) -> None:
    from audit.models import Event

    for role in (contextlib.nullcontext, acting_as_owner):  # the product's role, the owner
        with role(), pytest.raises(DatabaseError), transaction.atomic():
            Event.objects.filter(position=1).update(actor_name="someone else")
        with role(), pytest.raises(DatabaseError), transaction.atomic():
            Event.objects.filter(position=1).delete()
