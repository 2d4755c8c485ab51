"""``readiness.reset_identity`` against an agent off a guest (dry run) and a stand-in VMM that
answers ``nic_macs``: the MACs the NICs have now are asked while the agent is greeted, the NIC is
found by them, and a VMM that cannot say stops the start before anything is configured."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from vms.agent import readiness
from vms.hypervisors.base import HypervisorError, NetSpec, RuntimeDir, VMSpec

from .conftest import CREDENTIAL, RunningAgent

TEMPLATE_MAC = "02:aa:bb:cc:dd:01"
VM_MAC = "52:54:00:7a:00:0a"


class StandIn:
    """The two things reset_identity asks of a driver; the MAC follows after the configure."""

    def __init__(self, agent: RunningAgent, fail: bool = False) -> None:
        self.agent, self.fail = agent, fail
        self.asked: list[str] = []
        self.lock = threading.Lock()

    def agent_connect(self, runtime: RuntimeDir, timeout: float) -> socket.socket:
        return self.agent.connect()

    def nic_macs(self, runtime: RuntimeDir) -> dict[str, str]:
        with self.lock:
            self.asked.append(threading.current_thread().name)
            if self.fail:
                raise HypervisorError("QMP did not answer")
            return {"net0": TEMPLATE_MAC if len(self.asked) == 1 else VM_MAC}


SPEC = VMSpec(
    vm_id="vm1",
    nets=(NetSpec("t0", VM_MAC, "net0", address="10.0.9.10/24", gateway="10.0.9.1"),),
    extra={"hostname": "vm1"},
)


def test_the_macs_are_asked_beside_the_hello_and_checked_after(
    agent: RunningAgent, tmp_path: Path
) -> None:
    hv = StandIn(agent)
    readiness.reset_identity(hv, RuntimeDir(tmp_path), SPEC, CREDENTIAL)  # type: ignore[arg-type]
    # Once on a thread of its own while greeting, once on the caller's after the configure.
    assert len(hv.asked) == 2
    assert hv.asked[0] == "nic-macs" and hv.asked[1] != "nic-macs"


def test_a_vmm_that_cannot_say_its_macs_fails_the_start(
    agent: RunningAgent, tmp_path: Path
) -> None:
    hv = StandIn(agent, fail=True)
    with pytest.raises(HypervisorError, match="QMP did not answer"):
        readiness.reset_identity(hv, RuntimeDir(tmp_path), SPEC, CREDENTIAL)  # type: ignore[arg-type]
    assert hv.asked == ["nic-macs"]


def test_a_guest_without_nics_asks_nothing(agent: RunningAgent, tmp_path: Path) -> None:
    hv = StandIn(agent, fail=True)
    readiness.reset_identity(hv, RuntimeDir(tmp_path), SPEC.replace(nets=()), CREDENTIAL)  # type: ignore[arg-type]
    assert hv.asked == []
