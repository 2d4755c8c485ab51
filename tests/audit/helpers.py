"""Small helpers for event-store tests."""

from __future__ import annotations

from typing import Any

from audit import store
from audit.actor import Actor

ACTOR = Actor.system(channel="shell", name="tests")


def append_login_failures(username: str, n: int) -> None:
    for _ in range(n):
        store.append(
            "account", username, "auth.login_failed", {"reason": "bad_credentials"}, actor=ACTOR
        )


def append_user_events(user_id: str, n: int, **data: Any) -> list[store.RecordedEvent]:
    return store.append_many(
        [
            store.PendingEvent("user", user_id, "user.role_changed", {"i": i, **data})
            for i in range(n)
        ],
        actor=ACTOR,
    )
