"""Guest requests whose web process died between the request and its outcome: the reconciler
settles each, once it has waited longer than its verb may run (the lifecycle table's
``time_limit`` plus a margin), with the verb's failure event, reason "interrupted", caused by the
request; before that, and once an outcome is there, it leaves them alone."""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.core.exceptions import ValidationError
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.caller import Caller
from audit import store
from audit.models import Event
from vms import commands, guest, lifecycle, reconcile
from vms.agent.client import ExecResult

pytestmark = pytest.mark.django_db(transaction=True)

ASKED = {
    "exec": {"argv": ["sleep", "1"], "cwd": None, "env_keys": [], "stdin_size": 0, "timeout": 30},
    "file_upload": {"path": "/tmp/x", "size": 3},
    "file_download": {"path": "/tmp/x"},
}


@pytest.fixture
def owner(caller_for: Any) -> Caller:
    return caller_for("operator")


@pytest.fixture
def vm(owner: Caller, make_running_vm: Any) -> Any:
    return make_running_vm(owner)


@pytest.fixture
def api(owner: Caller, issue_token: Any) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {issue_token(owner.user)}")
    return client


def later(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """The reconciler runs ``seconds`` from now."""
    at = timezone.now() + timedelta(seconds=seconds)
    monkeypatch.setattr(reconcile.timezone, "now", lambda: at)


def bound(row: lifecycle.Verb) -> float:
    assert row.time_limit is not None
    return float(getattr(settings, row.time_limit)) + reconcile.GUEST_MARGIN_S


def status(api: APIClient, request: store.RecordedEvent) -> dict[str, Any]:
    response = api.get(f"/api/v1/requests/{request.event_id}/")
    assert response.status_code == 200, response.content
    return dict(response.json())


def test_every_guest_verb_has_a_time_limit_setting() -> None:
    assert lifecycle.GUEST_VERBS
    for row in lifecycle.GUEST_VERBS:
        assert row.time_limit, row.name
        assert float(getattr(settings, row.time_limit)) > 0


@pytest.mark.parametrize("row", lifecycle.GUEST_VERBS, ids=lambda r: r.name)
def test_a_guest_request_left_without_an_outcome_is_settled_as_interrupted(
    row: lifecycle.Verb,
    owner: Caller,
    vm: Any,
    api: APIClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The web process appended (and committed) the request, then died before any outcome.
    request = commands.request_guest_access(owner, vm, row.name, ASKED[row.name])
    assert status(api, request)["state"] == "pending"

    later(monkeypatch, bound(row) - 5)  # it may still be running: left alone
    assert reconcile.settle_guest_requests() == 0
    assert status(api, request)["state"] == "pending"

    later(monkeypatch, bound(row) + 5)
    assert reconcile.settle_guest_requests() == 1

    _, failed_type = row.outcomes()
    failed = Event.objects.get(causation_id=str(request.event_id))
    assert failed.type == failed_type
    assert failed.payload["code"] == "interrupted" and failed.payload["interrupted"] is True
    assert failed.payload["reason"].startswith("interrupted")
    assert failed.actor_type == "system"
    answer = status(api, request)
    assert answer["state"] == "failed"
    assert answer["outcome"]["type"] == failed_type
    # Once only, and a late outcome from the web tier is refused: one outcome per request.
    assert reconcile.settle_guest_requests(startup=True) == 0
    succeeded, _ = row.outcomes()
    with pytest.raises(commands.AlreadySettled):
        commands.record_guest_outcome(owner, request, succeeded, {})
    assert Event.objects.filter(causation_id=str(request.event_id)).count() == 1


def test_a_guest_request_with_an_outcome_is_left_alone(
    owner: Caller, vm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    row = lifecycle.guest_verb("exec")
    request = commands.request_guest_access(owner, vm, "exec", ASKED["exec"])
    commands.record_guest_outcome(owner, request, row.outcomes()[0], {"exit_code": 0})
    later(monkeypatch, bound(row) + 60)
    assert reconcile.settle_guest_requests(startup=True) == 0
    assert Event.objects.filter(causation_id=str(request.event_id)).count() == 1


def test_an_exec_asked_for_longer_than_the_limit_gets_its_own_bound(
    owner: Caller, vm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    row = lifecycle.guest_verb("exec")
    asked = settings.SANDBOX_EXEC_MAX_TIMEOUT_S + 1000  # recorded by a version without the cap
    commands.request_guest_access(owner, vm, "exec", {**ASKED["exec"], "timeout": asked})
    later(monkeypatch, bound(row) + 5)
    assert reconcile.settle_guest_requests() == 0
    later(monkeypatch, asked + reconcile.GUEST_MARGIN_S + 5)
    assert reconcile.settle_guest_requests() == 1


def test_the_startup_pass_finds_requests_older_than_the_minutely_pass_looks(
    owner: Caller, vm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    row = lifecycle.guest_verb("file_upload")
    request = commands.request_guest_access(owner, vm, "file_upload", ASKED["file_upload"])
    later(monkeypatch, bound(row) + reconcile.GUEST_LOOKBACK_S + 3600)
    assert reconcile.settle_guest_requests() == 0  # the minutely pass looks back a day
    counts = reconcile.reconcile(startup=True)  # the worker's start: the whole log
    assert counts["guest_settled"] == 1
    assert Event.objects.get(causation_id=str(request.event_id)).type == "vm.file_upload_failed"


def test_an_exec_that_outlives_its_settling_says_its_outcome_was_not_recorded(
    owner: Caller, vm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconciler settled the request while the command still ran: the web tier's late
    outcome is refused, and the caller is told the outcome is not in the log."""

    class LateAgent:
        def exec(self, argv: list[str], **_: Any) -> ExecResult:
            request = store.RecordedEvent.from_row(
                Event.objects.filter(type="vm.exec_requested")
                .order_by("-position")
                .values_list(*store.COLUMNS)[0]
            )
            commands.settle_interrupted_guest_request(
                reconcile.SYSTEM, request, {"reason": "interrupted", "code": "interrupted"}
            )
            return ExecResult(0, b"", b"", False, 0.01, stdout_size=0, stderr_size=0)

    @contextlib.contextmanager
    def session(vm: Any, **_: Any) -> Any:
        yield LateAgent()

    monkeypatch.setattr(guest, "agent_session", session)
    with pytest.raises(guest.OutcomeNotRecorded):
        guest.run_exec(owner, vm, ["true"], timeout=5)
    assert list(
        Event.objects.filter(type__startswith="vm.exec_").values_list("type", flat=True)
    ) == ["vm.exec_requested", "vm.exec_failed"]


def test_an_exec_timeout_beyond_the_limit_is_refused_before_anything_is_recorded(
    owner: Caller, vm: Any
) -> None:
    before = Event.objects.count()
    with pytest.raises(ValidationError):
        guest.run_exec(owner, vm, ["true"], timeout=settings.SANDBOX_EXEC_MAX_TIMEOUT_S + 1)
    assert Event.objects.count() == before
