"""What a network, a port forward and an egress policy may be: the checks of their inputs, and
whether this installation does sandbox networking at all (``SANDBOX_NETWORKING``).

Every value that later reaches the host (vms.network: rulesets, bridges, resolvers) is checked
here first, with an error naming the field (``ValidationError``, a 400 with nothing changed);
vms.network checks them again, with its own strict patterns, before it renders anything.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, ValidationError

from vms.network import names

__all__ = [
    "EGRESS_MODES",
    "PROTOCOLS",
    "check_allow_list",
    "check_bridge",
    "check_egress",
    "check_port_range",
    "check_subnet",
    "default_network_spec",
    "networking_enabled",
    "parse_port_range",
]

EGRESS_MODES = ("none", "allow-list", "internet")
PROTOCOLS = ("tcp", "udp")
CAP_NET_ADMIN = 12
_RANGE = re.compile(r"(\d{1,5})-(\d{1,5})")


def check_subnet(value: Any, field: str = "subnet") -> ipaddress.IPv4Network:
    """A private IPv4 network in CIDR form, /16 to /29, given exactly (no host bits)."""
    if not isinstance(value, str) or len(value) > 18:
        raise ValidationError({field: "an IPv4 network in CIDR form, e.g. 10.77.0.0/24"})
    try:
        net = ipaddress.IPv4Network(value, strict=True)
    except ValueError as exc:
        raise ValidationError({field: f"not an IPv4 network in CIDR form: {exc}"}) from None
    if "/" not in value:
        raise ValidationError({field: "give the prefix length, e.g. 10.77.0.0/24"})
    if not 16 <= net.prefixlen <= 29:
        raise ValidationError({field: "the prefix length must be between /16 and /29"})
    if not net.is_private or net.is_loopback or net.is_link_local or net.is_multicast:
        raise ValidationError({field: "a private range only (10/8, 172.16/12, 192.168/16)"})
    return net


def check_bridge(value: Any, field: str = "bridge") -> str:
    try:
        return names.check_ifname(value)
    except names.NetworkError:
        raise ValidationError(
            {field: "an interface name: a letter, then up to 14 letters, digits, '_', '.', '-'"}
        ) from None


def check_egress(value: Any, field: str = "egress") -> str:
    if value not in EGRESS_MODES:
        raise ValidationError({field: f"one of {', '.join(EGRESS_MODES)}"})
    return str(value)


def check_port_range(port_min: Any, port_max: Any) -> tuple[int, int]:
    """A host port range for forwards: 1024 to 65535, low to high (ports below 1024 are the
    host's own services')."""
    for field, value in (("port_min", port_min), ("port_max", port_max)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1024 <= value <= 65535:
            raise ValidationError({field: "a port between 1024 and 65535"})
    if port_min > port_max:
        raise ValidationError({"port_max": "must not be below port_min"})
    return port_min, port_max


def parse_port_range(text: str, setting: str = "SANDBOX_NETWORK_PORTS") -> tuple[int, int]:
    found = _RANGE.fullmatch(text.strip())
    if not found:
        raise ImproperlyConfigured(f"{setting} must be two ports, low-high, got {text!r}")
    try:
        return check_port_range(int(found.group(1)), int(found.group(2)))
    except ValidationError as exc:
        raise ImproperlyConfigured(f"{setting}: {exc.messages[0]}") from None


def check_allow_list(items: Any, field: str = "allow") -> list[str]:
    """An egress allow list: IPv4 networks in CIDR form (a host as a.b.c.d or a.b.c.d/32) and
    DNS names (a name covers its subdomains), at most ``SANDBOX_EGRESS_ALLOW_MAX`` entries.
    Canonical and without duplicates, in the order given; every bad entry is named."""
    limit = settings.SANDBOX_EGRESS_ALLOW_MAX
    if not isinstance(items, list | tuple):
        raise ValidationError({field: "a list of CIDRs and domain names"})
    if len(items) > limit:
        raise ValidationError({field: f"at most {limit} entries"})
    out: list[str] = []
    errors: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item or len(item) > 253:
            errors.append(f"{item!r}: a CIDR or a domain name")
            continue
        entry = _allow_entry(item.strip())
        if entry is None:
            errors.append(f"{item!r}: neither an IPv4 network (CIDR) nor a domain name")
        elif entry not in out:
            out.append(entry)
    if errors:
        raise ValidationError({field: errors})
    return out


def _allow_entry(item: str) -> str | None:
    if re.fullmatch(r"[0-9./]+", item):
        try:
            net = ipaddress.IPv4Network(item, strict=True)
        except ValueError:
            return None
        if net.is_multicast or net.prefixlen == 0:  # everything is egress internet
            return None
        return str(net)
    try:
        return names.check_domain(item)
    except names.NetworkError:
        return None


def default_network_spec() -> dict[str, Any]:
    """The default network as the settings describe it (checked: ImproperlyConfigured)."""
    try:
        subnet = check_subnet(settings.SANDBOX_NETWORK_CIDR, "SANDBOX_NETWORK_CIDR")
        bridge = check_bridge(settings.SANDBOX_NETWORK_BRIDGE, "SANDBOX_NETWORK_BRIDGE")
        egress = check_egress(settings.SANDBOX_DEFAULT_EGRESS, "SANDBOX_DEFAULT_EGRESS")
    except ValidationError as exc:
        problems = "; ".join(f"{k}: {v[0]}" for k, v in exc.message_dict.items())
        raise ImproperlyConfigured(problems) from None
    port_min, port_max = parse_port_range(settings.SANDBOX_NETWORK_PORTS)
    return {
        "name": "default",
        "subnet": str(subnet),
        "bridge": bridge,
        "isolated": True,
        "port_min": port_min,
        "port_max": port_max,
        "default_egress": egress,
        "is_default": True,
    }


def networking_enabled() -> bool:
    """``SANDBOX_NETWORKING``: on, off, or (auto) on when this process may create network
    namespaces (root or CAP_NET_ADMIN) and ``ip`` and ``nft`` exist. The host side (the worker)
    asks it before it plugs a NIC; the records (networks, leases, forwards) are kept either way,
    so a VM gets its NIC when it starts on a host where networking is on. The setting is read on
    every call (an override in a test or a reloaded setting takes effect); only what ``auto``
    probes of the process and the host is kept."""
    mode = settings.SANDBOX_NETWORKING
    if mode != "auto":
        return bool(mode == "on")
    return _host_may_network()


@lru_cache(maxsize=1)
def _host_may_network() -> bool:
    return _may_admin_network() and all(shutil.which(tool) for tool in ("ip", "nft"))


def _may_admin_network() -> bool:
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except OSError:
        return False
    return False
