"""A warm pool hand-out parks its greeted agent connection for the VM's first session
(``vms.guest.park``): that session sends no second hello, unless the connection was lost, when
it opens a fresh one that does. Real agents on unix sockets; no Django database."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vms import guest, runtime
from vms.agent import credentials
from vms.agent.client import AgentClient

from .conftest import CREDENTIAL, RunningAgent, start_agent, stop_agent


class CountingClient(AgentClient):
    """An agent client that counts the hellos it sends (as ``hello`` or in a pipeline)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hellos = 0

    def hello(self, *args: Any, **kwargs: Any) -> Any:
        self.hellos += 1
        return super().hello(*args, **kwargs)


@pytest.fixture
def vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """A VM as ``agent_session`` sees it: an id whose runtime directory exists."""
    vm_id = uuid.uuid4()
    root = tmp_path / "rt"
    root.mkdir()
    monkeypatch.setattr(runtime, "runtime_dir", lambda pk: SimpleNamespace(root=root))
    yield SimpleNamespace(pk=vm_id)
    guest._take_parked(vm_id)


def _greeted(agent: RunningAgent) -> CountingClient:
    client = CountingClient(agent.connect, timeout=20, credential=CREDENTIAL)
    client.pipeline([client.hello_request()])  # as the hand-out greets it
    return client


def test_greeted_says_whether_a_request_reaches_the_agent_that_answered(
    agent: RunningAgent,
) -> None:
    client = CountingClient(agent.connect, timeout=20, credential=CREDENTIAL)
    assert not client.greeted  # not connected, no hello
    client.connect(5)
    assert not client.greeted  # connected, no hello yet
    client.hello(timeout=10)
    assert client.greeted
    client.close()
    assert not client.greeted


def test_the_session_after_a_hand_out_reuses_its_connection_without_a_hello(
    agent: RunningAgent, vm: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[AgentClient] = []
    monkeypatch.setattr(credentials, "client_for_vm", lambda v: opened.append(v) or None)
    parked = _greeted(agent)
    guest.park(vm.pk, parked)
    with guest.agent_session(vm) as session:
        assert session is parked
        assert session.exec(["true"]).exit_code == 0
    assert parked.hellos == 0 and opened == []  # no second hello, no second connection
    assert not parked.greeted  # the session closed it


def test_a_parked_connection_that_was_lost_is_replaced_by_a_fresh_one_that_says_hello(
    short_dir: str, agent: RunningAgent, vm: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    (Path(short_dir) / "b").mkdir()
    second = start_agent(f"{short_dir}/b")
    try:
        fresh = CountingClient(second.connect, timeout=20, credential=CREDENTIAL)
        monkeypatch.setattr(credentials, "client_for_vm", lambda v: fresh)
        parked = _greeted(agent)
        guest.park(vm.pk, parked)
        stop_agent(agent)  # the guest's end of the parked connection goes away
        parked._reader.join(5)  # noqa: SLF001 - the reader notices the end
        with guest.agent_session(vm) as session:
            assert session is fresh and fresh.hellos == 1
            assert session.exec(["true"]).exit_code == 0
        assert not parked.greeted
    finally:
        stop_agent(second)
