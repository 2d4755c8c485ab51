"""A VM's identity on the network and in the guest: MAC, address, hostname.

Allocated inside the command's transaction under the event store lock, so two VMs never get
the same address; every clone or restore-as-new gets a fresh identity.
"""

from __future__ import annotations

import ipaddress
import re
import secrets

from django.conf import settings

from vms.models import ACTIVE_STATES, VirtualMachine

HOSTNAME_RE = re.compile(r"[^a-z0-9-]+")


def hostname_for(name: str) -> str:
    label = HOSTNAME_RE.sub("-", name.lower()).strip("-")[:63]
    return label or "sandbox"


def new_mac() -> str:
    # QEMU/KVM's OUI; uniqueness among live VMs is checked by the caller's allocation.
    taken = set(
        VirtualMachine.objects.filter(state__in=ACTIVE_STATES).values_list("mac", flat=True)
    )
    while True:
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
        if mac not in taken:
            return mac


def allocate_ip() -> str | None:
    """The lowest free host address of SANDBOX_NETWORK_CIDR (the first is the gateway)."""
    network = ipaddress.ip_network(settings.SANDBOX_NETWORK_CIDR)
    taken = {
        ip
        for ip in VirtualMachine.objects.filter(
            state__in=ACTIVE_STATES, ip__isnull=False
        ).values_list("ip", flat=True)
    }
    hosts = network.hosts()
    next(hosts, None)  # the gateway
    for address in hosts:
        if str(address) not in taken:
            return str(address)
    return None


def gateway() -> str:
    network = ipaddress.ip_network(settings.SANDBOX_NETWORK_CIDR)
    return str(next(network.hosts()))
