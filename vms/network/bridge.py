"""Bridges of the product namespace: one per network, holding the network's gateway address,
with its VMs' interfaces (TAPs, or veths in tests) as ports.

When a network isolates its VMs, every port is marked ``isolated``: the bridge then forwards
between an isolated port and the bridge itself only, never to another isolated port, so two VMs
on the network cannot exchange frames. Routed detours through the gateway are refused by the
ruleset (``ruleset.py``: the namespace never forwards from a bridge to a bridge).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from pyroute2 import IPRoute

from .names import NetworkError, check_ifname, check_ipv4, check_ipv4_network, check_netns
from .netns import call_in, exists, iproute

__all__ = [
    "Bridge",
    "attach",
    "detach",
    "ensure_bridge",
    "port_isolated",
    "present",
    "remove_bridge",
]


@dataclass(frozen=True)
class Bridge:
    """A network's bridge: its interface name, subnet and gateway (an address of the subnet,
    usually the first), and whether its ports are isolated from each other."""

    ifname: str
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    isolated: bool = True

    def __post_init__(self) -> None:
        check_ifname(self.ifname)
        check_ipv4_network(self.subnet)
        check_ipv4(self.gateway)
        if self.gateway not in self.subnet or self.gateway in (
            self.subnet.network_address,
            self.subnet.broadcast_address,
        ):
            raise NetworkError(f"gateway {self.gateway} is not a host address of {self.subnet}")
        if not self.subnet.is_private or self.subnet.prefixlen > 30:
            raise NetworkError(f"{self.subnet} is not a private subnet with room for guests")


def ensure_bridge(ns: str, bridge: Bridge) -> None:
    """Create the bridge when missing, give it the gateway address and bring it up; existing
    ports get the network's isolation setting (so a changed setting is applied by calling this
    again)."""
    check_netns(ns)
    with iproute(ns) as ipr:
        found = ipr.link_lookup(ifname=bridge.ifname)
        if not found:
            # No STP (guests are leaves) and no forwarding delay, so a new port passes frames at
            # once; IPv6 stays off on the bridge (see netns._prepare).
            ipr.link("add", ifname=bridge.ifname, kind="bridge", br_stp_state=0, br_forward_delay=0)
            found = ipr.link_lookup(ifname=bridge.ifname)
        index = found[0]
        kind = _kind(ipr, index)
        if kind != "bridge":
            raise NetworkError(f"{bridge.ifname} in {ns} is a {kind}, not a bridge")
        wanted = (str(bridge.gateway), bridge.subnet.prefixlen)
        for msg in ipr.get_addr(family=2, index=index):
            have = (msg.get_attr("IFA_ADDRESS"), msg["prefixlen"])
            if have != wanted:
                ipr.addr("del", index=index, address=have[0], prefixlen=have[1])
        if wanted not in [
            (m.get_attr("IFA_ADDRESS"), m["prefixlen"]) for m in ipr.get_addr(family=2, index=index)
        ]:
            ipr.addr("add", index=index, address=wanted[0], prefixlen=wanted[1])
        ipr.link("set", index=index, state="up")
        for port in ipr.get_links(master=index):
            ipr.brport("set", index=port["index"], isolated=int(bridge.isolated))


def remove_bridge(ns: str, ifname: str) -> None:
    """Remove the bridge (its ports are released, not deleted)."""
    with iproute(check_netns(ns)) as ipr:
        found = ipr.link_lookup(ifname=check_ifname(ifname))
        if found:
            ipr.link("del", index=found[0])


def attach(ns: str, ifname: str, bridge: Bridge) -> None:
    """Make interface ``ifname`` (already in namespace ``ns``) a port of ``bridge``, with the
    network's isolation, and bring it up. Idempotent."""
    check_netns(ns)
    check_ifname(ifname)

    # On a thread in the namespace, with a socket opened there: what a VM start waits for
    # (``IPRoute(netns=...)`` costs a process of its own).
    def work() -> None:
        with IPRoute() as ipr:
            port = _index(ipr, ns, ifname)
            master = _index(ipr, ns, bridge.ifname)
            if _kind(ipr, master) != "bridge":
                raise NetworkError(f"{bridge.ifname} in {ns} is not a bridge")
            ipr.link("set", index=port, master=master)
            ipr.brport("set", index=port, isolated=int(bridge.isolated))
            ipr.link("set", index=port, state="up")

    if not exists(ns):
        raise NetworkError(f"network namespace {ns} does not exist")
    call_in(ns, work)


def present(ns: str, ifname: str) -> bool:
    """Whether the bridge ``ifname`` is in namespace ``ns`` (a missing namespace has none)."""
    check_netns(ns)
    check_ifname(ifname)

    def look() -> bool:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=ifname)
            return bool(found) and _kind(ipr, found[0]) == "bridge"

    return exists(ns) and call_in(ns, look)


def detach(ns: str, ifname: str) -> None:
    """Release ``ifname`` from its bridge (the interface itself stays; a missing one is fine)."""
    with iproute(check_netns(ns)) as ipr:
        found = ipr.link_lookup(ifname=check_ifname(ifname))
        if found:
            ipr.link("set", index=found[0], master=0)


def port_isolated(ns: str, ifname: str) -> bool:
    """Whether the bridge port ``ifname`` has the isolated flag (for checks and the reconciler)."""
    with iproute(check_netns(ns)) as ipr:
        (msg,) = ipr.get_links(_index(ipr, ns, check_ifname(ifname)))
        info = msg.get_attr("IFLA_LINKINFO")
        if info is None or info.get_attr("IFLA_INFO_SLAVE_KIND") != "bridge":
            raise NetworkError(f"{ifname} in {ns} is not a bridge port")
        return bool(info.get_attr("IFLA_INFO_SLAVE_DATA").get_attr("IFLA_BRPORT_ISOLATED"))


def _index(ipr, ns: str, ifname: str) -> int:  # type: ignore[no-untyped-def]
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetworkError(f"no interface {ifname} in {ns}")
    return int(found[0])


def _kind(ipr, index: int) -> str | None:  # type: ignore[no-untyped-def]
    (msg,) = ipr.get_links(index)
    info = msg.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None
