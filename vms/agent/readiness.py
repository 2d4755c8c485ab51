"""The guest agent's part in saved-state templates (``vms.hypervisors.templates``).

Before a template guest is saved, wait for its agent and warm it up; after a guest is restored
from one, give it the VM's clock and identity. The callers hand these to a driver's
``template_cache`` as ``TemplateHooks`` (with a way to make data disks): drivers do not speak
the agent's protocol.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

from vms.agent.client import AgentClient, AgentError
from vms.hypervisors.base import Hypervisor, HypervisorError, RuntimeDir, VMSpec

__all__ = ["check_macs", "configure_guest", "nic_settings", "reset_identity", "wait_ready"]


def _hello(
    hv: Hypervisor,
    runtime: RuntimeDir,
    timeout: float,
    interval: float,
    credential: str | None,
) -> AgentClient:
    client = AgentClient.from_hypervisor(
        hv, runtime, connect_timeout=2.0, timeout=30.0, credential=credential
    )
    try:
        client.hello(timeout=timeout, interval=interval)
    except BaseException:
        client.close()
        raise
    return client


def wait_ready(hv: Hypervisor, runtime: RuntimeDir, timeout: float) -> str:
    """Wait for the agent, enroll it with a credential of the template's own (returned: the
    template cache keeps it beside the saved guest), then run each kind of request once before
    the template is saved.

    The agent imports its modules lazily (Python start-up is slow under TCG); whatever it has
    imported when the template is saved, every restored guest has for free. Measured: the first
    ``configure`` after a restore took ~0.5 s on a cold agent, a few ms on a warmed one.
    """
    credential = secrets.token_urlsafe(32)
    client = AgentClient.from_hypervisor(hv, runtime, connect_timeout=2.0, timeout=30.0)
    with client:
        try:
            client.hello(timeout=timeout, interval=0.2)
        except AgentError as exc:
            if exc.code != "not_enrolled":
                raise
        client.enroll(credential)
        client.hello(timeout=10.0)
        client.ping()
        client.health()
        client.configure(time=time.time(), hostname="sandbox")
        client.exec(["true"], stdin=b"warm")
        client.put_file(b"warm", "/run/.sandbox-warm")
        client.read_file("/run/.sandbox-warm")
        client.exec(["rm", "-f", "/run/.sandbox-warm"])
        # NICs down (the guest's init brings eth0 up): a guest restored from this template
        # sends nothing with the template's MAC before it has its own. Also warms ``network``.
        for mac in hv.nic_macs(runtime).values():
            client.network(match_mac=mac, up=False)
    return credential


def configure_guest(
    client: AgentClient,
    hv: Hypervisor,
    runtime: RuntimeDir,
    spec: VMSpec,
    current_macs: dict[str, str] | None = None,
) -> None:
    """Give a running guest its identity through its agent (``client``, after hello): the
    clock, the hostname (``spec.extra["hostname"]``, else its id), and for each NIC the VM's
    MAC, address, gateway and resolvers (``NetSpec``).

    Each NIC is found in the guest by the MAC its device has now (``hv.nic_macs``, or
    ``current_macs`` when the caller asked already): after a cold boot that is already the VM's;
    after a template restore, the template's. Used after every restore, and after a cold boot
    of a VM with NICs.
    """
    if not spec.nets:
        current: dict[str, str] = {}
    else:
        current = current_macs if current_macs is not None else hv.nic_macs(runtime)
    nics = nic_settings(spec, current)
    # The first NIC rides with the clock and hostname: one round trip fewer on every restore.
    client.configure(
        time=time.time(),
        hostname=spec.extra.get("hostname", spec.vm_id),
        **(nics[0] if nics else {}),
    )
    for nic in nics[1:]:
        client.network(**nic)
    if nics:
        check_macs(hv, runtime, spec)


def nic_settings(spec: VMSpec, current: dict[str, str]) -> list[dict[str, Any]]:
    """For each of ``spec``'s NICs, what ``configure`` (or ``network``) gives the guest: the
    NIC found by the MAC its device has now (``current``, from ``hv.nic_macs``), its new MAC,
    address, gateway and resolvers."""
    nics: list[dict[str, Any]] = []
    for i, net in enumerate(spec.nets):
        nid = net.id or f"net{i}"
        if nid not in current:
            raise HypervisorError(f"the VMM reports no NIC {nid} (it has {sorted(current)})")
        nics.append(
            {
                "match_mac": current[nid],
                "mac": net.mac.lower(),
                "address": net.address or None,
                "gateway": net.gateway or None,
                "dns": list(net.dns) if net.dns else None,
            }
        )
    return nics


def check_macs(hv: Hypervisor, runtime: RuntimeDir, spec: VMSpec) -> None:
    """Each NIC's device has the spec's MAC now (the guest set it), or HypervisorError."""
    moved = hv.nic_macs(runtime)
    for i, net in enumerate(spec.nets):
        nid = net.id or f"net{i}"
        if moved.get(nid) != net.mac.lower():
            raise HypervisorError(f"NIC {nid} still has MAC {moved.get(nid)}, not {net.mac}")


def reset_identity(
    hv: Hypervisor, runtime: RuntimeDir, spec: VMSpec, credential: str | None = None
) -> None:
    """The restored guest's clock lags by the time the template spent saved, and its hostname
    and MACs are the template's: set them, and the VM's addresses (``configure_guest``).
    ``credential``: the template's (``wait_ready``); the caller rotates it to the VM's own."""
    # The MACs the NICs have now are asked of the VMM while the agent is greeted.
    macs: dict[str, str] = {}
    failed: list[BaseException] = []

    def ask() -> None:
        try:
            macs.update(hv.nic_macs(runtime))
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    asking = threading.Thread(target=ask, name="nic-macs") if spec.nets else None
    if asking is not None:
        asking.start()
    try:
        # The restored guest is already running: poll its agent briskly (a hello sent while
        # the agent is between polls of its port is lost, and the client's back-off would add
        # ~0.3 s).
        with _hello(hv, runtime, 30.0, 0.05, credential) as client:
            if asking is not None:
                asking.join()
                if failed:
                    raise failed[0]
            configure_guest(client, hv, runtime, spec, macs if asking is not None else None)
    finally:
        if asking is not None:
            asking.join()
