"""Guest access fails closed: the request event is committed before the agent is asked, so a
command or transfer never happens unrecorded; its outcome (completed or failed) follows, caused
by the request.

The agent is a recording stand-in for ``vms.guest.agent_session`` (what reaches the guest, and
when); the real-guest version of "nothing runs" is in test_guest_fail_closed_real.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.db import connection, transaction
from django.urls import re_path
from rest_framework.test import APIClient

from accounts.caller import Caller
from audit.models import Event
from vms import guest
from vms.agent.client import AgentError, AgentTimeout, ExecResult, Transfer, _iter_source
from vms.exec_consumer import ExecConsumer

pytestmark = pytest.mark.django_db(transaction=True)

GUEST_TYPES = ("vm.exec_", "vm.file_")


class RecordingAgent:
    """Stands in for the agent client: records what reaches it, and what the log held then."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail: Exception | None = None

    def _asked(self, op: str, what: Any) -> None:
        requests = list(
            Event.objects.filter(type__endswith="_requested", type__startswith="vm.")
            .exclude(type__in=("vm.start_requested",))
            .values_list("type", flat=True)
        )
        self.calls.append((op, what, connection.in_atomic_block, requests))
        if self.fail is not None:
            raise self.fail

    def exec(self, argv: list[str], *, on_stdout: Any = None, **_: Any) -> ExecResult:
        self._asked("exec", argv)
        if on_stdout is not None:
            on_stdout(b"ran\n")
        return ExecResult(0, b"", b"", False, 0.01, stdout_size=4, stderr_size=0)

    def put_file(self, source: Any, path: str, **_: Any) -> Transfer:
        self._asked("put", path)
        data = b"".join(_iter_source(source))
        return Transfer(path, len(data), hashlib.sha256(data).hexdigest())

    def get_file(self, path: str, dest: Any, **_: Any) -> Transfer:
        self._asked("get", path)
        dest.write(b"from the guest")
        return Transfer(path, 14, hashlib.sha256(b"from the guest").hexdigest())


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> RecordingAgent:
    fake = RecordingAgent()

    @contextlib.contextmanager
    def session(vm: Any, **_: Any) -> Any:
        yield fake

    monkeypatch.setattr(guest, "agent_session", session)
    return fake


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


def guest_events(vm: Any) -> list[Event]:
    return [
        e
        for e in Event.objects.filter(aggregate_id=str(vm.pk)).order_by("position")
        if e.type.startswith(GUEST_TYPES)
    ]


def assert_request_then_outcome(vm: Any, request_type: str, outcome_type: str) -> Event:
    events = guest_events(vm)
    assert [e.type for e in events] == [request_type, outcome_type]
    request, outcome = events
    assert outcome.causation_id == str(request.event_id)
    return outcome


# --- The request comes first, committed ---------------------------------------------------------


def test_exec_is_recorded_and_committed_before_the_agent_is_asked(vm, api, agent) -> None:
    response = api.post(f"/api/v1/vms/{vm.pk}/exec/", {"argv": ["touch", "/x"]}, format="json")
    assert response.status_code == 200, response.content
    [(op, argv, in_transaction, requests_then)] = agent.calls
    assert (op, argv) == ("exec", ["touch", "/x"])
    assert not in_transaction  # committed, not merely appended in an open transaction
    assert requests_then == ["vm.exec_requested"]
    completed = assert_request_then_outcome(vm, "vm.exec_requested", "vm.exec_completed")
    assert completed.position == response.json()["event_position"]
    assert guest_events(vm)[0].payload["argv"] == ["touch", "/x"]


def test_upload_and_download_are_recorded_before_the_agent_is_asked(vm, api, agent) -> None:
    url = f"/api/v1/vms/{vm.pk}/files/?path=/tmp/f"
    put = api.put(url, b"data", content_type="application/octet-stream")
    assert put.status_code == 201, put.content
    got = api.get(url)
    assert got.status_code == 200
    assert [(c[0], c[2], c[3]) for c in agent.calls] == [
        ("put", False, ["vm.file_upload_requested"]),
        ("get", False, ["vm.file_upload_requested", "vm.file_download_requested"]),
    ]
    types = [e.type for e in guest_events(vm)]
    assert types == [
        "vm.file_upload_requested",
        "vm.file_uploaded",
        "vm.file_download_requested",
        "vm.file_downloaded",
    ]


def test_a_guest_access_inside_an_open_transaction_is_refused(vm, owner, agent) -> None:
    # The request would not be committed before the guest acts.
    with pytest.raises(RuntimeError), transaction.atomic():
        guest.run_exec(owner, vm, ["true"])
    assert agent.calls == []


# --- When the log cannot take the request, nothing reaches the guest ----------------------------


def test_exec_is_refused_with_503_and_not_run_when_the_log_cannot_record_it(
    vm, api, agent, append_lock_held
) -> None:
    with append_lock_held():
        response = api.post(f"/api/v1/vms/{vm.pk}/exec/", {"argv": ["touch", "/x"]}, format="json")
    assert response.status_code == 503, response.content
    assert "nothing was done" in response.json()["detail"]
    assert agent.calls == []
    assert guest_events(vm) == []


@pytest.mark.parametrize("method", ["put", "get"])
def test_a_transfer_is_refused_with_503_when_the_log_cannot_record_it(
    vm, api, agent, append_lock_held, method
) -> None:
    url = f"/api/v1/vms/{vm.pk}/files/?path=/tmp/f"
    with append_lock_held():
        if method == "put":
            response = api.put(url, b"data", content_type="application/octet-stream")
        else:
            response = api.get(url)
    assert response.status_code == 503, response.content
    assert agent.calls == []
    assert guest_events(vm) == []


def test_dashboard_exec_is_refused_with_503_when_the_log_cannot_record_it(
    vm, owner, agent, append_lock_held, client
) -> None:
    client.force_login(owner.user)
    with append_lock_held():
        response = client.post(
            f"/vms/{vm.pk}/exec/", {"command": "touch /x"}, HTTP_ACCEPT="application/json"
        )
    assert response.status_code == 503
    assert "nothing was done" in response.json()["error"]
    assert agent.calls == []


APP = URLRouter([re_path(r"^ws/vms/(?P<vm_id>[0-9a-f-]+)/exec/$", ExecConsumer.as_asgi())])


async def test_exec_websocket_is_refused_when_the_log_cannot_record_it(
    vm, owner, agent, append_lock_held
) -> None:
    communicator = WebsocketCommunicator(APP, f"/ws/vms/{vm.pk}/exec/")
    communicator.scope["user"] = owner.user
    connected, _ = await communicator.connect()
    assert connected
    try:
        with append_lock_held():
            await communicator.send_to(text_data=json.dumps({"argv": ["touch", "/x"]}))
            frame = json.loads(await communicator.receive_from(timeout=20))
    finally:
        await communicator.disconnect()
        from django.db import connections

        await database_sync_to_async(connections.close_all)()
    assert frame["type"] == "error" and frame["status"] == 503, frame
    assert agent.calls == []


# --- The agent fails after the request: a failure event caused by it ----------------------------


def test_exec_whose_agent_times_out_leaves_the_request_and_a_failure(vm, api, agent) -> None:
    agent.fail = AgentTimeout("exec sleep: no answer from the guest in time")
    response = api.post(f"/api/v1/vms/{vm.pk}/exec/", {"argv": ["sleep", "99"]}, format="json")
    assert response.status_code == 504, response.content
    failed = assert_request_then_outcome(vm, "vm.exec_requested", "vm.exec_failed")
    assert failed.payload["agent_timed_out"] is True
    assert failed.payload["code"] == "timeout"
    assert failed.payload["argv"] == ["sleep", "99"]


def test_upload_whose_agent_times_out_leaves_the_request_and_a_failure(vm, api, agent) -> None:
    agent.fail = AgentTimeout("put: no answer from the guest in time")
    response = api.put(
        f"/api/v1/vms/{vm.pk}/files/?path=/tmp/f", b"data", content_type="application/octet-stream"
    )
    assert response.status_code == 504, response.content
    failed = assert_request_then_outcome(vm, "vm.file_upload_requested", "vm.file_upload_failed")
    assert failed.payload["path"] == "/tmp/f"
    assert failed.payload["agent_timed_out"] is True


def test_an_unreachable_guest_leaves_the_request_and_a_failure(vm, api) -> None:
    # No fake: this host has no VMM for the VM, so the agent session cannot open.
    response = api.get(f"/api/v1/vms/{vm.pk}/files/?path=/etc/hostname")
    assert response.status_code == 503, response.content
    failed = assert_request_then_outcome(
        vm, "vm.file_download_requested", "vm.file_download_failed"
    )
    assert failed.payload["code"] == "GuestUnavailable"


def test_dashboard_exec_of_a_missing_command_is_a_clean_error_and_a_failure_event(
    vm, owner, agent, client
) -> None:
    # What the agent answers when the program does not exist in the guest.
    agent.fail = AgentError("exec_failed", "not_found: No such file or directory: 'nosuch'")
    client.force_login(owner.user)
    response = client.post(
        f"/vms/{vm.pk}/exec/", {"command": "nosuch"}, HTTP_ACCEPT="application/json"
    )
    assert response.status_code == 502
    assert "not_found" in response.json()["error"]
    failed = assert_request_then_outcome(vm, "vm.exec_requested", "vm.exec_failed")
    assert failed.payload["code"] == "exec_failed"


def test_an_outcome_the_log_refuses_is_not_answered_as_nothing_done(
    vm, api, agent, monkeypatch
) -> None:
    from audit.errors import EventStoreUnavailable
    from vms import commands

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise EventStoreUnavailable("event store unavailable: test")

    monkeypatch.setattr(commands, "record_guest_outcome", refuse)
    response = api.post(
        f"/api/v1/vms/{vm.pk}/files/?path=/tmp/f",
        {"file": io.BytesIO(b"x")},
        format="multipart",
    )
    assert response.status_code == 503
    detail = response.json()["detail"]
    assert "was transferred" in detail and "nothing was done" not in detail
    [request] = guest_events(vm)
    assert request.type == "vm.file_upload_requested"
    assert str(request.event_id) in detail


def test_the_status_of_a_guest_access_request_is_its_outcome(vm, api, agent) -> None:
    assert (
        api.post(f"/api/v1/vms/{vm.pk}/exec/", {"argv": ["id"]}, format="json").status_code == 200
    )
    agent.fail = AgentTimeout("no answer")
    assert (
        api.post(f"/api/v1/vms/{vm.pk}/exec/", {"argv": ["id"]}, format="json").status_code == 504
    )
    done, failed = (e for e in guest_events(vm) if e.type == "vm.exec_requested")
    for request, state, outcome in (
        (done, "succeeded", "vm.exec_completed"),
        (failed, "failed", "vm.exec_failed"),
    ):
        body = api.get(f"/api/v1/requests/{request.event_id}/").json()
        assert (body["state"], body["outcome"]["type"]) == (state, outcome)
