"""A VM's identity on the network and in the guest: MAC, address on its network, hostname.

Allocated inside the command's transaction under the event store lock, so two VMs never get
the same address; every clone or restore-as-new gets a fresh identity. An address is leased
(``net.ip_leased``) from the VM's network and stays taken until ``net.ip_released`` (appended
with the VM's ``vm.destroyed``): the VM's ``ip`` column is the lease.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import uuid
from collections.abc import Iterator

from django.db.models import Q

from core.compiled import CompiledQuery, cached
from vms.models import ACTIVE_STATES, Network, VirtualMachine

HOSTNAME_RE = re.compile(r"[^a-z0-9-]+")


def hostname_for(name: str) -> str:
    label = HOSTNAME_RE.sub("-", name.lower()).strip("-")[:63]
    return label or "sandbox"


# Compiled once (core.compiled): it runs under the event store's lock.
MAC_STAND_INS = [f"stand-in-mac-{i}" for i in range(4)]


NETWORK_STAND_IN = uuid.UUID("5a4d0000-0000-4000-8000-00000000ae7f")


@cached
def _taken_query() -> CompiledQuery:
    """The addresses leased on one network, and whether the candidate MACs are taken by a live
    VM, in one query."""
    leased = Q(network_id=NETWORK_STAND_IN, ip__isnull=False)
    macs = Q(state__in=ACTIVE_STATES, mac__in=MAC_STAND_INS)
    return CompiledQuery(
        VirtualMachine.objects.filter(leased | macs).values("mac", "ip", "network_id"),
        {"network": NETWORK_STAND_IN} | {f"m{i}": mac for i, mac in enumerate(MAC_STAND_INS)},
    )


def allocate(network: Network | None) -> tuple[str, str | None]:
    """A MAC unused by any live VM, and the lowest host address of ``network`` after its
    gateway that no VM holds a lease on; the address is None when the network is full or the VM
    gets none (``network`` None: no NIC).

    One query that reads only what it must: the addresses leased on the network (at most its
    size, whatever the number of VMs) and which of four random MACs are taken (indexed).
    """
    while True:
        # QEMU/KVM's OUI and three random bytes.
        candidates = [
            "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3)) for _ in range(4)
        ]
        rows = _taken_query().run(
            network=network.pk if network is not None else NETWORK_STAND_IN,
            **{f"m{i}": mac for i, mac in enumerate(candidates)},
        )
        taken_macs = {row["mac"] for row in rows}
        free = [mac for mac in candidates if mac not in taken_macs]
        if free:
            break
    if network is None:
        return free[0], None
    taken_ips = {row["ip"] for row in rows if row["ip"] and row["network_id"] == network.pk}
    for ip in _host_addresses(network.subnet):
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


def gateway(subnet: str) -> str:
    """The first host address of ``subnet``: the bridge's, the VMs' gateway."""
    return str(next(ipaddress.ip_network(subnet).hosts()))


def tap_for(vm_id: uuid.UUID) -> str:
    """The name of a VM's TAP device in the product namespace (15 characters at most)."""
    return "t" + vm_id.hex[:12]
