"""Projections: applied exactly once, and a rebuild from zero equals the incremental result."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.test import override_settings

from accounts import commands
from accounts.models import LoginState
from audit import projections
from audit.actor import Actor
from audit.models import ActivityCount, ProjectionCheckpoint
from tests.audit.helpers import append_user_events

pytestmark = pytest.mark.django_db


def login_rows() -> list[tuple]:
    return list(
        LoginState.objects.order_by("username").values_list(
            "username",
            "recent_failures",
            "failure_count",
            "locked_until",
            "last_login_at",
            "last_failure_at",
        )
    )


def activity_rows() -> list[tuple]:
    return list(
        ActivityCount.objects.order_by("day", "event_type", "actor_name").values_list(
            "day", "event_type", "actor_name", "count"
        )
    )


@override_settings(SANDBOX_LOCKOUT_THRESHOLD=3)
def test_rebuild_gives_exactly_the_incremental_read_models(make_user) -> None:
    user = make_user("operator", "olga")
    anon = Actor.anonymous("olga")
    for _ in range(3):
        commands.record_login_failure(anon, "olga", "bad_credentials")  # third one locks
    commands.unlock(Actor.system(), "olga")
    commands.record_login_failure(anon, "olga", "bad_credentials")
    commands.record_login(Actor.for_user(user), user)
    make_user("viewer", "nobody")  # failures of existing accounts only are account events
    commands.record_login_failure(Actor.anonymous("nobody"), "nobody", "bad_credentials")
    append_user_events("x", 20)
    projections.run_pending()

    before_login, before_activity = login_rows(), activity_rows()
    assert [r[0] for r in before_login] == ["nobody", "olga"]
    assert sum(r[3] for r in before_activity) > 25

    call_command("rebuild_projections", "accounts.login_state")
    call_command("rebuild_projections", "audit.activity")
    assert login_rows() == before_login
    # The rebuild events themselves are followed later; the counts before them are identical.
    rebuilt = {r[:3]: r[3] for r in activity_rows()}
    for row in before_activity:
        assert rebuilt[row[:3]] == row[3]


def test_followed_projection_applies_each_event_once() -> None:
    append_user_events("a", 7)
    assert projections.run_pending() == 7
    assert projections.run_pending() == 0
    append_user_events("a", 2, more=True)
    assert projections.run_pending() == 2
    assert sum(ActivityCount.objects.values_list("count", flat=True)) == 9
    head = ProjectionCheckpoint.objects.get(name="audit.activity").position
    assert head == 9
    assert projections.lag_by_projection() == {"audit.activity": 0}


def test_inline_projection_is_visible_in_the_same_transaction(make_user) -> None:
    make_user("viewer", "zed")
    commands.record_login_failure(Actor.anonymous("zed"), "zed", "bad_credentials")
    state = LoginState.objects.get(username="zed")
    assert state.failure_count == 1
    assert ProjectionCheckpoint.objects.get(name="accounts.login_state").position >= 1


@override_settings(SANDBOX_LOCKOUT_THRESHOLD=2, SANDBOX_LOCKOUT_WINDOW_S=60)
def test_lockout_is_derived_from_event_times(make_user) -> None:
    make_user("viewer", "vic")
    commands.record_login_failure(Actor.anonymous("vic"), "vic", "bad_credentials")
    until = commands.record_login_failure(Actor.anonymous("vic"), "vic", "bad_credentials")
    assert until is not None
    assert commands.is_locked("vic") == until
    assert commands.is_locked("vic", now=until + timedelta(seconds=1)) is None


def test_unknown_projection_name_is_a_clear_error() -> None:
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="known: accounts.login_state, audit.activity"):
        call_command("rebuild_projections", "nope")
