"""The dashboard's command box answers every failure as the API does: the same status and the
same words (one mapping, vms.errors), as JSON the page can show, never Django's HTML 500; and a
command that failed in the guest leaves the same events whichever way it was asked for.

The guest is a stand-in for ``vms.guest.agent_session`` (what the web tier answers); a real
guest's missing command is in tests/dashboard/test_vm_page_browser.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client
from rest_framework.test import APIClient

from audit.errors import ConcurrencyError, EventStoreUnavailable
from audit.models import Event
from vms import commands, guest
from vms.agent.client import AgentDisconnected, AgentError, AgentTimeout

pytestmark = pytest.mark.django_db

MISSING = AgentError("exec_failed", "not_found: No such file or directory: nosuchcmd")


class FailingAgent:
    def __init__(self) -> None:
        self.fail: Exception = MISSING

    def exec(self, argv: list[str], **_: Any) -> Any:
        raise self.fail


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> FailingAgent:
    fake = FailingAgent()

    @contextlib.contextmanager
    def session(vm: Any, **_: Any) -> Any:
        yield fake

    monkeypatch.setattr(guest, "agent_session", session)
    return fake


@pytest.fixture
def owner(caller_for: Any) -> Any:
    return caller_for("operator")


@pytest.fixture
def ask_both(owner: Any, make_running_vm: Any, issue_token: Any) -> Callable[[str], Any]:
    """Ask the API and the dashboard to run ``command`` in one VM; both answers and the guest
    events each left."""
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {issue_token(owner.user)}")
    page = Client(raise_request_exception=False)
    page.force_login(owner.user)

    def ask(command: str) -> tuple[Any, Any, list[list[str]]]:
        events = []
        answers = []
        for name, post in (
            (
                "api",
                lambda vm: api.post(
                    f"/api/v1/vms/{vm.pk}/exec/", {"argv": [command]}, format="json"
                ),
            ),
            (
                "page",
                lambda vm: page.post(
                    f"/vms/{vm.pk}/exec/", {"command": command}, HTTP_ACCEPT="application/json"
                ),
            ),
        ):
            vm = make_running_vm(owner, name=f"{name}-vm")
            answers.append(post(vm))
            events.append(
                list(
                    Event.objects.filter(aggregate_id=str(vm.pk), type__startswith="vm.exec_")
                    .order_by("position")
                    .values_list("type", flat=True)
                )
            )
        return answers[0], answers[1], events

    return ask


@pytest.mark.parametrize(
    "failure",
    [
        MISSING,
        AgentError("not_found", "no such file"),
        AgentTimeout("exec: no answer from the agent in time"),
        AgentDisconnected("the agent went away"),
        guest.GuestUnavailable("the guest agent does not answer"),
        EventStoreUnavailable("lock timeout"),
        ConcurrencyError("vm", "x", 3, 4),
    ],
    ids=lambda e: type(e).__name__ + (f"-{e.code}" if isinstance(e, AgentError) else ""),
)
def test_the_command_box_answers_each_failure_as_the_api_does(
    ask_both, agent, monkeypatch, failure
) -> None:
    if isinstance(failure, AgentError | guest.GuestUnavailable):
        agent.fail = failure
    else:  # the log refuses the request: nothing reaches the guest

        def refuse(*_: Any, **__: Any) -> Any:
            raise failure

        monkeypatch.setattr(commands, "request_guest_access", refuse)
    api, page, (api_events, page_events) = ask_both("nosuchcmd")
    assert page.status_code == api.status_code, page.content
    assert page.status_code in (404, 409, 502, 503, 504)
    assert page["Content-Type"] == "application/json"
    body = page.json()
    assert body["error"] == api.json()["detail"]
    assert {k: v for k, v in body.items() if k != "error"} == api.json()
    assert page_events == api_events


def test_a_missing_command_is_a_502_that_names_it_and_leaves_its_failure_in_the_log(
    ask_both, agent
) -> None:
    _, page, (_, page_events) = ask_both("nosuchcmd")
    assert page.status_code == 502
    assert "nosuchcmd" in page.json()["error"]
    assert page_events == ["vm.exec_requested", "vm.exec_failed"]
    failed = Event.objects.get(type="vm.exec_failed", aggregate_id__in=_page_vm_ids())
    assert failed.payload["argv"] == ["nosuchcmd"]
    assert "nosuchcmd" in failed.payload["reason"]


def _page_vm_ids() -> list[str]:
    from vms.models import VirtualMachine

    return [
        str(pk) for pk in VirtualMachine.objects.filter(name="page-vm").values_list("pk", flat=True)
    ]


def test_a_refused_form_is_a_400_with_the_field_in_words(owner, make_running_vm) -> None:
    vm = make_running_vm(owner)
    page = Client()
    page.force_login(owner.user)
    answer = page.post(f"/vms/{vm.pk}/exec/", {"command": ""}, HTTP_ACCEPT="application/json")
    assert answer.status_code == 400
    assert answer.json()["error"].startswith("command: ")
    assert not Event.objects.filter(type="vm.exec_requested").exists()
