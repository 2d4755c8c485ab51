"""Projection of auth events into ``LoginState`` (inline: the lockout check reads its lock).

``recent_failures`` lists the checked failures of the current lockout window, by the rule the
lockout counts them with (``accounts.throttle.note_name_failure``); attempts refused while the
account was locked (reason ``locked``) are no failures and appear nowhere here."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from django.conf import settings

from accounts.models import LoginState
from audit.projections import Projector, load_rows, register, update_rows
from audit.store import RecordedEvent

MAX_RECENT_FAILURES = 50


@register
class LoginStateProjector(Projector):
    name = "accounts.login_state"
    event_types = frozenset(
        {"auth.login_failed", "auth.logged_in", "auth.locked_out", "auth.unlocked"}
    )
    inline = True

    def handle(self, events: Sequence[RecordedEvent]) -> None:
        names = {e.aggregate_id for e in events}
        states = load_rows(LoginState, names)
        created: set[str] = set()
        window = timedelta(seconds=int(settings.SANDBOX_LOCKOUT_WINDOW_S))
        for e in events:
            state = states.get(e.aggregate_id)
            if state is None:
                state = states[e.aggregate_id] = LoginState(username=e.aggregate_id)
                created.add(e.aggregate_id)
            at = e.recorded_at
            if e.type == "auth.login_failed":
                if e.data.get("reason") == "locked":
                    # Refused while locked, its password never checked: not a failure.
                    continue
                recent = state.recent_failures
                # The lockout's rule (accounts.throttle.note_name_failure): a window opens at
                # the first failure and lasts SANDBOX_LOCKOUT_WINDOW_S; a later failure opens
                # the next one.
                if recent and at - datetime.fromisoformat(recent[0]) >= window:
                    recent = []
                state.recent_failures = (recent + [at.isoformat()])[-MAX_RECENT_FAILURES:]
                state.failure_count += 1
                state.last_failure_at = at
            elif e.type == "auth.logged_in":
                state.recent_failures = []
                state.last_login_at = at
            elif e.type == "auth.locked_out":
                state.locked_until = datetime.fromisoformat(e.data["until"])
                state.recent_failures = []
            elif e.type == "auth.unlocked":
                state.locked_until = None
                state.recent_failures = []
        LoginState.objects.bulk_create([states[n] for n in created])
        fields = [
            "recent_failures",
            "failure_count",
            "locked_until",
            "last_login_at",
            "last_failure_at",
        ]
        update_rows(LoginState, [s for n, s in states.items() if n not in created], fields)

    def reset(self) -> None:
        LoginState.objects.all().delete()
