"""A VM's identity on the network and in the guest: MAC, address, hostname.

Allocated inside the command's transaction under the event store lock, so two VMs never get
the same address; every clone or restore-as-new gets a fresh identity.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Iterator

from django.conf import settings
from django.db.models import Q

from core.compiled import CompiledQuery, cached
from vms.models import ACTIVE_STATES, VirtualMachine

HOSTNAME_RE = re.compile(r"[^a-z0-9-]+")


def hostname_for(name: str) -> str:
    label = HOSTNAME_RE.sub("-", name.lower()).strip("-")[:63]
    return label or "sandbox"


# Compiled once (core.compiled): it runs under the event store's lock.
MAC_STAND_INS = [f"stand-in-mac-{i}" for i in range(4)]


@cached
def _taken_query() -> CompiledQuery:
    """Live VMs' addresses, and whether the candidate MACs are taken, in one query."""
    live = VirtualMachine.objects.filter(state__in=ACTIVE_STATES)
    return CompiledQuery(
        live.filter(Q(ip__isnull=False) | Q(mac__in=MAC_STAND_INS)).values("mac", "ip"),
        {f"m{i}": mac for i, mac in enumerate(MAC_STAND_INS)},
    )


def allocate() -> tuple[str, str | None]:
    """A MAC and the lowest free host address of SANDBOX_NETWORK_CIDR (the first is the
    gateway), both unused by any live VM; the address is None when the network is full.

    One query that reads only what it must: the addresses in use (at most the network's size,
    whatever the number of VMs) and which of four random MACs are taken (indexed).
    """
    while True:
        # QEMU/KVM's OUI and three random bytes.
        candidates = [
            "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3)) for _ in range(4)
        ]
        rows = _taken_query().run(**{f"m{i}": mac for i, mac in enumerate(candidates)})
        taken_macs = {row["mac"] for row in rows}
        free = [mac for mac in candidates if mac not in taken_macs]
        if free:
            break
    taken_ips = {row["ip"] for row in rows if row["ip"]}
    for ip in _host_addresses(settings.SANDBOX_NETWORK_CIDR):
        if ip not in taken_ips:
            return free[0], ip
    return free[0], None


def _host_addresses(cidr: str) -> Iterator[str]:
    """The network's host addresses after the gateway, in order, as text."""
    network = ipaddress.ip_network(cidr)
    if network.version == 4 and network.num_addresses > 2:
        # Formatted directly: ipaddress objects cost microseconds each, and a nearly full
        # network is walked on every create.
        for n in range(int(network.network_address) + 2, int(network.broadcast_address)):
            yield f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
        return
    hosts = network.hosts()
    next(hosts, None)  # the gateway
    for address in hosts:
        yield str(address)


def gateway() -> str:
    network = ipaddress.ip_network(settings.SANDBOX_NETWORK_CIDR)
    return str(next(network.hosts()))
