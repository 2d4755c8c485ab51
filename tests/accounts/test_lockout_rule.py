"""One lockout rule for every username, real or made up (the answers say nothing about which
names exist), counting only failures whose password was checked."""

from __future__ import annotations

import re
import time

import pytest
from django.test import Client, override_settings

from accounts.models import LoginState
from audit.models import Event

PASSWORD = "pw-Long-enough-1"
INVALID = "invalid"
LOCKED = "locked"


def attempt(client: Client, username: str, address: str) -> str:
    response = client.post(
        "/accounts/login/", {"username": username, "password": "wrong"}, REMOTE_ADDR=address
    )
    text = response.content.decode()
    if "This account is locked" in text:
        return LOCKED
    assert re.search(r"Please enter a correct username", text), text
    return INVALID


NAMES = (("real-name", "192.0.2.51"), ("made-up-name", "192.0.2.52"))


def run(phases: list[tuple[float, int]]) -> dict[str, list[list[str]]]:
    """At each (seconds from the start, attempts): that many wrong passwords for each name,
    interleaved, so both names see the same times."""
    clients = {name: Client() for name, _ in NAMES}
    answers: dict[str, list[list[str]]] = {name: [] for name, _ in NAMES}
    start = time.monotonic()
    for at, count in phases:
        time.sleep(max(0.0, start + at - time.monotonic()))
        for name, _ in NAMES:
            answers[name].append([])
        for _ in range(count):
            for name, address in NAMES:
                answers[name][-1].append(attempt(clients[name], name, address))
    return answers


WINDOW_S = 4


@pytest.mark.django_db
@override_settings(
    SANDBOX_LOCKOUT_THRESHOLD=5,
    SANDBOX_LOCKOUT_WINDOW_S=WINDOW_S,
    SANDBOX_LOCKOUT_S=60,
    SANDBOX_LOGIN_SOURCE_FAILURES=100,
)
def test_real_and_made_up_names_count_failures_in_the_same_window(make_user) -> None:
    """One failure, three more before the window ends, three after it: a real name used to lock
    (sliding window) where a made-up one did not (its count restarted).

    Timed from the first failures themselves (on a loaded machine a request can take long)."""
    make_user("operator", "real-name", password=PASSWORD)
    before_first = time.monotonic()
    answers = run([(0.0, 1)])
    after_first = time.monotonic()
    for name, more in run([(0.0, 3)]).items():
        answers[name] += more
    assert time.monotonic() < before_first + WINDOW_S, "the second phase took too long"
    time.sleep(max(0.0, after_first + WINDOW_S + 0.3 - time.monotonic()))
    for name, more in run([(0.0, 3)]).items():
        answers[name] += more
    assert answers["real-name"] == answers["made-up-name"]
    # The window opened by the first failure has ended: the last three count in a new one.
    assert answers["real-name"] == [[INVALID], [INVALID] * 3, [INVALID] * 3]
    assert not Event.objects.filter(type="auth.locked_out").exists()
    # The account's projection follows the same rule: the failures of the current window.
    assert len(LoginState.objects.get(username="real-name").recent_failures) == 3


LOCK_S = 4


# A lock clears its name's counts once committed: let transactions commit.
@pytest.mark.django_db(transaction=True)
@override_settings(
    SANDBOX_LOCKOUT_THRESHOLD=3,
    SANDBOX_LOCKOUT_WINDOW_S=600,
    SANDBOX_LOCKOUT_S=LOCK_S,
    SANDBOX_LOGIN_SOURCE_FAILURES=100,
)
def test_attempts_refused_while_locked_are_not_failures(make_user) -> None:
    """Three failures lock, three attempts during the lock are refused unchecked; after the lock
    one wrong password locks neither name again, and the lock states the checked failures.

    Timed from the attempts themselves, not from the start: on a loaded machine the first
    phase alone can take longer than a short lock."""
    make_user("operator", "real-name", password=PASSWORD)
    clients = {name: Client() for name, _ in NAMES}
    answers: dict[str, list[list[str]]] = {name: [[], [], []] for name, _ in NAMES}

    def phase(index: int, count: int) -> None:
        for _ in range(count):
            for name, address in NAMES:
                answers[name][index].append(attempt(clients[name], name, address))

    phase(0, 2)
    lock_from = time.monotonic()  # no lock can have started before the third failures
    phase(0, 1)
    locked_at_latest = time.monotonic()
    phase(1, 3)
    assert time.monotonic() < lock_from + LOCK_S, "the attempts during the lock took too long"
    time.sleep(max(0.0, locked_at_latest + LOCK_S + 0.3 - time.monotonic()))
    phase(2, 1)
    assert answers["real-name"] == answers["made-up-name"]
    assert answers["real-name"] == [[INVALID, INVALID, LOCKED], [LOCKED] * 3, [INVALID]]
    locks = list(Event.objects.filter(type="auth.locked_out"))
    assert len(locks) == 1 and locks[0].payload["failures"] == 3
    reasons = [e.payload["reason"] for e in Event.objects.filter(type="auth.login_failed")]
    assert reasons.count("locked") == 3 and reasons.count("bad_credentials") == 4
    state = LoginState.objects.get(username="real-name")
    assert state.failure_count == 4 and len(state.recent_failures) == 1


@pytest.mark.django_db
@override_settings(SANDBOX_LOCKOUT_THRESHOLD=2, SANDBOX_LOCKOUT_WINDOW_S=600)
def test_a_locked_attempt_without_a_request_is_no_failure(make_user) -> None:
    """authenticate() without a request (no address, no page) refuses a locked name unchecked:
    recorded with reason locked, not as a wrong password of the account."""
    from django.contrib.auth import authenticate

    make_user("operator", "real-name", password=PASSWORD)
    for _ in range(2):
        assert authenticate(None, username="real-name", password="wrong") is None
    assert Event.objects.filter(type="auth.locked_out").count() == 1
    assert authenticate(None, username="real-name", password=PASSWORD) is None
    reasons = [e.payload["reason"] for e in Event.objects.filter(type="auth.login_failed")]
    assert reasons == ["bad_credentials", "bad_credentials", "locked"]
    assert LoginState.objects.get(username="real-name").failure_count == 2
