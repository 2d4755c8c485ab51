"""Validation of every name and number that reaches a netlink call, an nftables ruleset or a
dnsmasq configuration.

Rulesets and configurations are text, so the only safe values are those that cannot carry syntax:
``ipaddress`` objects, ints checked against a range and names matched against strict patterns.
Nothing here accepts free text; a caller with a user-facing name (a network's display name, a
VM's title) maps it to an id first.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = [
    "NetworkError",
    "check_domain",
    "check_ifname",
    "check_ipv4",
    "check_ipv4_network",
    "check_key",
    "check_mac",
    "check_netns",
    "check_port",
]


class NetworkError(RuntimeError):
    """A namespace, link, ruleset or resolver operation failed or was given an invalid value."""


# IFNAMSIZ is 16 with the terminating NUL. No '/', ':' or whitespace (the kernel refuses some,
# nft and dnsmasq would read the others as syntax).
_IFNAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,14}")
# Names of /run/netns entries: a file name, kept to what `ip netns` and nft identifiers accept.
_NETNS = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")
# Keys that become parts of nftables identifiers (chains, sets) and file names: VM and network
# ids (a UUID's hex, a slug). nft identifiers may not start with a digit, so callers' keys are
# always used behind a prefix ("vm_", "net_").
_KEY = re.compile(r"[a-z0-9][a-z0-9_]{0,39}")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def check_ifname(name: str) -> str:
    if not isinstance(name, str) or not _IFNAME.fullmatch(name):
        raise NetworkError(f"invalid interface name: {name!r}")
    return name


def check_netns(name: str) -> str:
    if not isinstance(name, str) or not _NETNS.fullmatch(name):
        raise NetworkError(f"invalid network namespace name: {name!r}")
    return name


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise NetworkError(f"invalid key (lowercase letters, digits, '_'; 1-40): {key!r}")
    return key


def check_mac(mac: str) -> str:
    if not isinstance(mac, str) or not _MAC.fullmatch(mac.lower()):
        raise NetworkError(f"invalid MAC address: {mac!r}")
    return mac.lower()


def check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise NetworkError(f"invalid port: {port!r}")
    return port


def check_domain(name: str) -> str:
    """A DNS name in its ASCII (IDNA) form, lowercase, without a trailing dot. Internationalised
    names are converted by the caller; wildcards are not names (a name covers its subdomains)."""
    if not isinstance(name, str):
        raise NetworkError(f"invalid domain name: {name!r}")
    candidate = name.lower().rstrip(".")
    labels = candidate.split(".")
    if (
        len(candidate) > 253
        or len(labels) < 2
        or not all(_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise NetworkError(f"invalid domain name: {name!r}")
    return candidate


def check_ipv4(value: object) -> ipaddress.IPv4Address:
    if not isinstance(value, ipaddress.IPv4Address):
        raise NetworkError(f"expected an IPv4 address object: {value!r}")
    return value


def check_ipv4_network(value: object) -> ipaddress.IPv4Network:
    if not isinstance(value, ipaddress.IPv4Network):
        raise NetworkError(f"expected an IPv4 network object: {value!r}")
    return value
