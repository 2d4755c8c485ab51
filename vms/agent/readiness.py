"""The guest agent's part in saved-state templates (``vms.hypervisors.templates``).

Before a template guest is saved, wait for its agent and warm it up; after a guest is restored
from one, give it the VM's clock and identity. The callers hand these to a driver's
``template_cache`` as ``TemplateHooks`` (with a way to make data disks): drivers do not speak
the agent's protocol.
"""

from __future__ import annotations

import time

from vms.agent.client import AgentClient
from vms.hypervisors.base import Hypervisor, RuntimeDir, VMSpec

__all__ = ["reset_identity", "wait_ready"]


def _hello(hv: Hypervisor, runtime: RuntimeDir, timeout: float, interval: float) -> AgentClient:
    client = AgentClient.from_hypervisor(hv, runtime, connect_timeout=2.0, timeout=30.0)
    try:
        client.hello(timeout=timeout, interval=interval)
    except BaseException:
        client.close()
        raise
    return client


def wait_ready(hv: Hypervisor, runtime: RuntimeDir, timeout: float) -> None:
    """Wait for the agent, then run each kind of request once before the template is saved.

    The agent imports its modules lazily (Python start-up is slow under TCG); whatever it has
    imported when the template is saved, every restored guest has for free. Measured: the first
    ``configure`` after a restore took ~0.5 s on a cold agent, a few ms on a warmed one.
    """
    with _hello(hv, runtime, timeout, 0.2) as client:
        client.ping()
        client.health()
        client.configure(time=time.time(), hostname="sandbox")
        client.exec(["true"], stdin=b"warm")
        client.put_file(b"warm", "/run/.sandbox-warm")
        client.read_file("/run/.sandbox-warm")
        client.exec(["rm", "-f", "/run/.sandbox-warm"])


def reset_identity(hv: Hypervisor, runtime: RuntimeDir, spec: VMSpec) -> None:
    """The restored guest's clock lags by the time the template spent saved, and its hostname
    is the template's: set both (the hostname from ``spec.extra["hostname"]``, else its id)."""
    # The restored guest is already running: poll its agent briskly (a hello sent while the
    # agent is between polls of its port is lost, and the client's back-off would add ~0.3 s).
    with _hello(hv, runtime, 30.0, 0.05) as client:
        client.configure(time=time.time(), hostname=spec.extra.get("hostname", spec.vm_id))
