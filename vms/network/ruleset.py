"""The nftables rules of the product namespace: one ``inet`` table (routing decisions: isolation,
egress, NAT, port forwards) and one ``bridge`` table (each bridge port may only speak with its
VM's MAC and address), both named ``table`` (default ``sandbox``).

Text is rendered only from validated values (``ipaddress`` objects, ints in range, names matched
by the patterns of ``names.py``) and loaded as ``nft -f -`` would inside the namespace (through
libnftables in this process: ``nftlib``), so each load is one kernel transaction: it applies
whole or not at all.

The base (``apply_base``) is fixed: hooked chains that dispatch through verdict maps keyed by a
VM's address, bridge port or forwarded port. Everything about one VM lives in chains and sets
named ``vm_<key>_*`` plus its map elements, added and removed in one transaction
(``apply_vm``/``remove_vm``), so a VM's rules come and go with it and a half-applied VM cannot
exist. See docs/networking.md for a rendered example.

What the rules guarantee (tests/network/ checks each):
- frames from a bridge port carry the port's MAC and address, or are dropped (no spoofing a
  neighbour's address to borrow its egress policy);
- routed traffic from one bridge to a bridge (another network, or a detour through the gateway
  around port isolation) is refused;
- guests reach nothing in the namespace itself except their own resolver on the gateway, and
  nothing in ``blocked`` (the host link and whatever addresses of the host the caller lists);
- egress is ``none``, ``allow-list`` (CIDRs and the addresses the VM's resolver answered for its
  allowed names) or ``internet`` (out of the uplink), masqueraded behind the uplink's address;
- refused packets are counted per VM and (destination, protocol, port) in a dynamic set.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pyroute2 import Conntrack
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from . import nftlib
from .bridge import Bridge
from .names import (
    NetworkError,
    check_ifname,
    check_ipv4,
    check_ipv4_network,
    check_key,
    check_mac,
    check_port,
)
from .netns import HostLink, call_in, run

__all__ = [
    "DEFAULT_TABLE",
    "EGRESS_MODES",
    "Fabric",
    "Forward",
    "VmRules",
    "apply_base",
    "apply_vm",
    "connections",
    "forget_connections",
    "load",
    "read_refused",
    "remove_base",
    "remove_vm",
    "render_base",
    "render_vm",
    "reset_refused",
    "vm_keys",
]

DEFAULT_TABLE = "sandbox"
EGRESS_MODES = ("none", "allow-list", "internet")
Egress = Literal["none", "allow-list", "internet"]
NFT = "/usr/sbin/nft"
_TABLE = re.compile(r"[a-z][a-z0-9_]{0,31}")
# Per-VM bound on distinct refused (destination, protocol, port) triples kept between reads; a
# guest that scans gets its first N counted and the rest dropped uncounted (still refused).
REFUSED_SET_SIZE = 4096
# Verdict maps of the inet table, all keyed by the VM's address except ``forwards``.
_ADDRESS_MAPS = ("fwd_from", "in_from", "pre_from", "post_from")
_VM_CHAINS = ("fwd", "in", "pre", "post", "fw", "refuse")


def _check_table(name: str) -> str:
    if not isinstance(name, str) or not _TABLE.fullmatch(name):
        raise NetworkError(f"invalid table name: {name!r}")
    return name


@dataclass(frozen=True)
class Fabric:
    """What the base rules need to know about the namespace: the link to the host (its namespace
    side ``host_ifname`` is where forwards arrive, at ``forward_address``; ``host_address`` is the
    one source outside the namespace that may open connections to guests directly, for the web
    server's previews), the networks' bridges, and ``blocked``: destinations no guest reaches,
    whatever its policy (the host link's subnet always; add the host's own addresses when the
    uplink leads through the host)."""

    host_ifname: str
    host_address: ipaddress.IPv4Address
    forward_address: ipaddress.IPv4Address
    host_subnet: ipaddress.IPv4Network
    bridges: tuple[str, ...] = ()
    blocked: tuple[ipaddress.IPv4Network, ...] = ()
    table: str = DEFAULT_TABLE

    def __post_init__(self) -> None:
        check_ifname(self.host_ifname)
        check_ipv4(self.host_address)
        check_ipv4(self.forward_address)
        check_ipv4_network(self.host_subnet)
        for name in self.bridges:
            check_ifname(name)
        for net in self.blocked:
            check_ipv4_network(net)
        _check_table(self.table)

    @classmethod
    def for_link(
        cls,
        link: HostLink,
        bridges: Iterable[str] = (),
        blocked: Iterable[ipaddress.IPv4Network] = (),
        table: str = DEFAULT_TABLE,
    ) -> Fabric:
        return cls(
            host_ifname=link.ns_ifname,
            host_address=link.host_address,
            forward_address=link.ns_address,
            host_subnet=link.subnet,
            bridges=tuple(bridges),
            blocked=tuple(blocked),
            table=table,
        )


@dataclass(frozen=True)
class Forward:
    """A port forward: ``host_port`` on the namespace side of the host link to ``guest_port``."""

    protocol: Literal["tcp", "udp"]
    host_port: int
    guest_port: int

    def __post_init__(self) -> None:
        if self.protocol not in ("tcp", "udp"):
            raise NetworkError(f"invalid protocol: {self.protocol!r}")
        check_port(self.host_port)
        check_port(self.guest_port)


@dataclass(frozen=True)
class VmRules:
    """One VM NIC's rules: its key (an id, see ``names.check_key``), bridge, address, the bridge
    port it uses (a TAP, named by the VMM side) and that port's MAC, egress policy, and forwards.
    ``uplink`` is the interface egress leaves by (required unless egress is ``none``);
    ``dns_port`` the port of the VM's resolver on the gateway (``dns.py``; None: no DNS)."""

    key: str
    bridge: Bridge
    address: ipaddress.IPv4Address
    port_ifname: str
    mac: str
    egress: Egress = "none"
    allow_cidrs: tuple[ipaddress.IPv4Network, ...] = ()
    uplink: str | None = None
    dns_port: int | None = None
    forwards: tuple[Forward, ...] = field(default=())

    def __post_init__(self) -> None:
        check_key(self.key)
        if not isinstance(self.bridge, Bridge):
            raise NetworkError("bridge must be a Bridge")
        check_ipv4(self.address)
        if self.address not in self.bridge.subnet or self.address in (
            self.bridge.gateway,
            self.bridge.subnet.network_address,
            self.bridge.subnet.broadcast_address,
        ):
            raise NetworkError(f"{self.address} is not a guest address of {self.bridge.subnet}")
        check_ifname(self.port_ifname)
        object.__setattr__(self, "mac", check_mac(self.mac))
        if self.egress not in EGRESS_MODES:
            raise NetworkError(f"invalid egress policy: {self.egress!r}")
        for net in self.allow_cidrs:
            check_ipv4_network(net)
        if self.egress != "none":
            if self.uplink is None:
                raise NetworkError(f"egress {self.egress} needs an uplink interface")
            check_ifname(self.uplink)
        if self.dns_port is not None:
            check_port(self.dns_port)
        seen: set[tuple[str, int]] = set()
        for fwd in self.forwards:
            if not isinstance(fwd, Forward):
                raise NetworkError("forwards must be Forward objects")
            if (fwd.protocol, fwd.host_port) in seen:
                raise NetworkError(f"host port {fwd.protocol}/{fwd.host_port} forwarded twice")
            seen.add((fwd.protocol, fwd.host_port))


def _q(name: str) -> str:
    """An interface name as an nft string literal (validated names never contain quotes)."""
    return f'"{check_ifname(name)}"'


def _elements(values: Iterable[str]) -> str:
    return ", ".join(values)


def _base_chain(family: str, t: str, name: str, kind: str, priority: str, policy: str) -> str:
    # ``name`` is also the hook (input, forward, prerouting, postrouting).
    return (
        f"add chain {family} {t} {name} "
        f"{{ type {kind} hook {name} priority {priority}; policy {policy}; }}"
    )


def render_base(fabric: Fabric) -> str:
    """The base of both tables. Re-applying it replaces the base chains' rules and the bridges and
    blocked sets but keeps every VM's chains, sets and map elements."""
    t = fabric.table
    host = _q(fabric.host_ifname)
    blocked = _elements(str(n) for n in (fabric.host_subnet, *fabric.blocked))
    lines = [
        f"add table inet {t}",
        f"add set inet {t} bridges {{ type ifname; }}",
        f"add set inet {t} blocked {{ type ipv4_addr; flags interval; }}",
        f"add map inet {t} fwd_from {{ type ipv4_addr : verdict; }}",
        f"add map inet {t} in_from {{ type ipv4_addr : verdict; }}",
        f"add map inet {t} pre_from {{ type ipv4_addr : verdict; }}",
        f"add map inet {t} post_from {{ type ipv4_addr : verdict; }}",
        f"add map inet {t} forwards {{ type inet_proto . inet_service : verdict; }}",
        _base_chain("inet", t, "input", "filter", "filter", "drop"),
        _base_chain("inet", t, "forward", "filter", "filter", "drop"),
        _base_chain("inet", t, "prerouting", "nat", "dstnat", "accept"),
        _base_chain("inet", t, "postrouting", "nat", "srcnat", "accept"),
        f"flush chain inet {t} input",
        f"flush chain inet {t} forward",
        f"flush chain inet {t} prerouting",
        f"flush chain inet {t} postrouting",
        f"flush set inet {t} bridges",
        f"flush set inet {t} blocked",
        *(
            [f"add element inet {t} bridges {{ {_elements(_q(b) for b in fabric.bridges)} }}"]
            if fabric.bridges
            else []
        ),
        f"add element inet {t} blocked {{ {blocked} }}",
        # The namespace's own services: loopback and answers to its own connections (the
        # resolvers' upstream queries); guests only through their chain (their resolver).
        f"add rule inet {t} input iif lo accept",
        f"add rule inet {t} input ct state established,related accept",
        f"add rule inet {t} input iifname @bridges ip saddr vmap @in_from",
        # Routed traffic: answers pass; the host's own address may open connections to guests
        # (previews through the web server), as may forwards (DNAT'd below); everything a guest
        # opens goes through its chain; the rest is dropped by the policy.
        f"add rule inet {t} forward ct state established,related accept",
        f"add rule inet {t} forward ct state invalid drop",
        f"add rule inet {t} forward iifname {host} oifname @bridges "
        f"ip saddr {fabric.host_address} accept",
        f"add rule inet {t} forward iifname {host} oifname @bridges ct status dnat accept",
        f"add rule inet {t} forward iifname @bridges ip saddr vmap @fwd_from",
        f"add rule inet {t} prerouting iifname @bridges ip saddr vmap @pre_from",
        f"add rule inet {t} prerouting iifname {host} ip daddr {fabric.forward_address} "
        "meta l4proto . th dport vmap @forwards",
        # A forward reached from beyond the host link is answered through the gateway (the
        # guest's route back to the client may not exist); the host itself keeps its address.
        f"add rule inet {t} postrouting oifname @bridges ct status dnat "
        f"ip saddr != {fabric.host_subnet} masquerade",
        f"add rule inet {t} postrouting ip saddr vmap @post_from",
        # Layer 2: a frame from a port must carry its VM's MAC and address (see render_vm).
        f"add table bridge {t}",
        f"add map bridge {t} ports {{ type ifname : verdict; }}",
        _base_chain("bridge", t, "prerouting", "filter", "filter", "drop"),
        f"flush chain bridge {t} prerouting",
        f"add rule bridge {t} prerouting iifname vmap @ports",
    ]
    return "\n".join(lines) + "\n"


def _chain(key: str, part: str) -> str:
    return f"vm_{key}_{part}"


def render_vm(fabric: Fabric, vm: VmRules) -> str:
    """Commands that create one VM's chains, sets and map elements (after ``_render_vm_removal``
    of its old ones when replacing)."""
    t = fabric.table
    k = vm.key
    br = _q(vm.bridge.ifname)
    gw = vm.bridge.gateway
    ip = vm.address
    c = {part: _chain(k, part) for part in _VM_CHAINS}
    lines = [
        f"add set inet {t} vm_{k}_cidr {{ type ipv4_addr; flags interval; }}",
        f"add set inet {t} vm_{k}_dns {{ type ipv4_addr; }}",
        f"add set inet {t} vm_{k}_refused {{ type ipv4_addr . inet_proto . inet_service; "
        f"flags dynamic; size {REFUSED_SET_SIZE}; counter; }}",
        f"flush set inet {t} vm_{k}_cidr",
    ]
    if vm.egress == "allow-list" and vm.allow_cidrs:
        cidrs = _elements(str(n) for n in ipaddress.collapse_addresses(vm.allow_cidrs))
        lines.append(f"add element inet {t} vm_{k}_cidr {{ {cidrs} }}")
    for part in _VM_CHAINS:
        lines.append(f"add chain inet {t} {c[part]}")
    refused = f"@vm_{k}_refused"
    lines += [
        # Counted, then refused at once (a reset or an ICMP error, so the guest fails fast).
        f"add rule inet {t} {c['refuse']} meta l4proto tcp "
        f"add {refused} {{ ip daddr . meta l4proto . th dport }} reject with tcp reset",
        f"add rule inet {t} {c['refuse']} meta l4proto udp "
        f"add {refused} {{ ip daddr . meta l4proto . th dport }} "
        "reject with icmpx type admin-prohibited",
        f"add rule inet {t} {c['refuse']} add {refused} {{ ip daddr . meta l4proto . 0 }} "
        "reject with icmpx type admin-prohibited",
        # Toward the namespace itself: the VM's own resolver only.
        f"add rule inet {t} {c['in']} iifname != {br} drop",
    ]
    if vm.dns_port is not None:
        lines += [
            f"add rule inet {t} {c['pre']} ip daddr {gw} meta l4proto {{ tcp, udp }} th dport 53 "
            f"dnat ip to {gw}:{vm.dns_port}",
            f"add rule inet {t} {c['in']} ip daddr {gw} meta l4proto {{ tcp, udp }} "
            f"th dport {vm.dns_port} accept",
        ]
    lines += [
        f"add rule inet {t} {c['in']} goto {c['refuse']}",
        # Routed: only from its own bridge, never to a bridge, never to what is blocked.
        f"add rule inet {t} {c['fwd']} iifname != {br} drop",
        f"add rule inet {t} {c['fwd']} oifname @bridges goto {c['refuse']}",
        f"add rule inet {t} {c['fwd']} ip daddr @blocked goto {c['refuse']}",
    ]
    if vm.egress == "allow-list":
        up = _q(vm.uplink or "")
        lines += [
            f"add rule inet {t} {c['fwd']} oifname {up} ip daddr @vm_{k}_cidr accept",
            f"add rule inet {t} {c['fwd']} oifname {up} ip daddr @vm_{k}_dns accept",
        ]
    elif vm.egress == "internet":
        lines.append(f"add rule inet {t} {c['fwd']} oifname {_q(vm.uplink or '')} accept")
    lines.append(f"add rule inet {t} {c['fwd']} goto {c['refuse']}")
    if vm.egress != "none":
        lines.append(f"add rule inet {t} {c['post']} oifname {_q(vm.uplink or '')} masquerade")
    for fwd in vm.forwards:
        lines.append(
            f"add rule inet {t} {c['fw']} meta l4proto {fwd.protocol} th dport {fwd.host_port} "
            f"dnat ip to {ip}:{fwd.guest_port}"
        )
    # ``create`` (not ``add``): an address or host port already held by another VM fails the
    # whole transaction instead of silently keeping the other VM's element.
    for name, part in zip(_ADDRESS_MAPS, ("fwd", "in", "pre", "post"), strict=True):
        lines.append(f"create element inet {t} {name} {{ {ip} : jump {c[part]} }}")
    for fwd in vm.forwards:
        lines.append(
            f"create element inet {t} forwards {{ {fwd.protocol} . {fwd.host_port} : "
            f"jump {c['fw']} }}"
        )
    port = _chain(k, "port")
    lines += [
        f"add chain bridge {t} {port}",
        f"add rule bridge {t} {port} ether saddr != {vm.mac} drop",
        f"add rule bridge {t} {port} meta protocol arp arp saddr ether != {vm.mac} drop",
        # 0.0.0.0: address conflict probes (RFC 5227) of the guest's network stack.
        f"add rule bridge {t} {port} meta protocol arp arp saddr ip != {{ {ip}, 0.0.0.0 }} drop",
        f"add rule bridge {t} {port} meta protocol ip ip saddr != {ip} drop",
        f"add rule bridge {t} {port} meta protocol != {{ ip, arp }} drop",
        f"add rule bridge {t} {port} accept",
        f"create element bridge {t} ports {{ {_q(vm.port_ifname)} : jump {port} }}",
    ]
    return "\n".join(lines) + "\n"


def load(ns: str, text: str, *, check_only: bool = False) -> None:
    """Load ``text`` as ``nft -f -`` would inside ``ns``: one transaction, all or nothing
    (through libnftables in this process when it can be loaded, else the ``nft`` program)."""
    if nftlib.available():
        result = nftlib.run(ns, text, dry_run=check_only)
        if result.returncode != 0:
            raise NetworkError(f"nft in {ns} failed: {result.error.strip()}")
        return
    argv = [NFT, "-c", "-f", "-"] if check_only else [NFT, "-f", "-"]
    run(ns, argv, input=text.encode())


def _list_json(ns: str, *what: str) -> list[dict[str, Any]]:
    if nftlib.available():
        listed = nftlib.run(ns, " ".join(["list", *what]), json=True)
        ok, output = listed.returncode == 0, listed.output
    else:
        result = run(ns, [NFT, "-j", "list", *what], check=False)
        ok, output = result.returncode == 0, result.stdout.decode()
    if not ok:
        return []
    items: list[dict[str, Any]] = json.loads(output)["nftables"]
    return items


def apply_base(ns: str, fabric: Fabric) -> None:
    load(ns, render_base(fabric))


def remove_base(ns: str, table: str = DEFAULT_TABLE) -> None:
    """Delete both tables (every VM's rules with them)."""
    _check_table(table)
    for family in ("inet", "bridge"):
        if _list_json(ns, "table", family, table):
            load(ns, f"delete table {family} {table}\n")


def _render_vm_removal(
    ns: str, table: str, key: str, *, keep_sets: bool
) -> tuple[list[str], set[ipaddress.IPv4Address]]:
    """Commands that remove what the live ruleset holds for VM ``key``: its map elements (looked
    up by their jump target, whatever address or port they have), then its chains (emptied
    first, since they jump to each other), then its sets unless ``keep_sets``; and the addresses
    it had."""
    t = _check_table(table)
    k = check_key(key)
    prefix = f"vm_{k}_"
    lines: list[str] = []
    chains: list[tuple[str, str]] = []
    sets: list[str] = []
    addresses: set[ipaddress.IPv4Address] = set()
    for family in ("inet", "bridge"):
        for item in _list_json(ns, "table", family, t):
            if "chain" in item and item["chain"]["name"].startswith(prefix):
                chains.append((family, item["chain"]["name"]))
            elif "set" in item and item["set"]["name"].startswith(prefix):
                sets.append(item["set"]["name"])
            elif "map" in item:
                for key_value in item["map"].get("elem", []):
                    elem_key, verdict = key_value
                    target = verdict.get("jump", verdict.get("goto", {})).get("target", "")
                    if target.startswith(prefix):
                        if item["map"]["name"] == "fwd_from":
                            addresses.add(ipaddress.IPv4Address(elem_key))
                        lines.append(
                            f"delete element {family} {t} {item['map']['name']} "
                            f"{{ {_render_key(elem_key)} }}"
                        )
    lines += [f"flush chain {family} {t} {name}" for family, name in chains]
    lines += [f"delete chain {family} {t} {name}" for family, name in chains]
    if not keep_sets:
        lines += [f"delete set inet {t} {name}" for name in sets]
    return lines, addresses


def _render_key(value: Any) -> str:
    """A map key read back from ``nft -j``, rendered after checking that it is one of ours."""
    if isinstance(value, dict) and "concat" in value:
        proto, port = value["concat"]
        if proto not in ("tcp", "udp"):
            raise NetworkError(f"unexpected forward key {value!r}")
        return f"{proto} . {check_port(int(port))}"
    if isinstance(value, str):
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            return _q(value)
    raise NetworkError(f"unexpected map key {value!r}")


def apply_vm(ns: str, fabric: Fabric, vm: VmRules, *, forget_established: bool = False) -> None:
    """Install or replace VM ``vm.key``'s rules in one transaction. A replacement keeps the VM's
    sets (addresses its resolver answered, refused counters) and rewrites everything else, so a
    changed policy or forward never leaves an old rule behind.

    Connections already established pass on (the rules decide about new ones): a replacement
    that adds a forward must not cut the guest's downloads. When a policy gets stricter, pass
    ``forget_established`` so that the guest's tracked connections are dropped with it."""
    removal, _ = _render_vm_removal(ns, fabric.table, vm.key, keep_sets=True)
    load(ns, "\n".join(removal) + "\n" + render_vm(fabric, vm))
    if forget_established:
        forget_connections(ns, vm.address)


def remove_vm(ns: str, key: str, table: str = DEFAULT_TABLE) -> None:
    """Remove every chain, set and map element of VM ``key`` in one transaction (nothing named
    for it remains in ``nft list ruleset``). A VM without rules is fine."""
    removal, addresses = _render_vm_removal(ns, table, key, keep_sets=False)
    if removal:
        load(ns, "\n".join(removal) + "\n")
    # Tracked connections would otherwise outlive the rules (answers pass as "established"),
    # and a later VM given the same address would inherit them.
    for address in addresses:
        forget_connections(ns, address)


def _tracked(ct: Any, address: ipaddress.IPv4Address) -> list[Any]:
    # Opened by the guest (original source) or reaching it (answer source: forwards, previews);
    # one connection is listed once even when both match (a guest talking to itself).
    entries: dict[int, Any] = {}
    for match in (
        {"tuple_orig": NFCTAttrTuple(saddr=str(address))},
        {"tuple_reply": NFCTAttrTuple(saddr=str(address))},
    ):
        for entry in ct.dump_entries(**match):
            entries.setdefault(entry.id, entry)
    return list(entries.values())


def connections(ns: str, address: ipaddress.IPv4Address) -> int:
    """How many connections the namespace tracks from or to guest ``address``."""
    check_ipv4(address)

    def count() -> int:
        with Conntrack() as ct:
            return len(_tracked(ct, address))

    return int(call_in(ns, count))


def forget_connections(ns: str, address: ipaddress.IPv4Address) -> int:
    """Drop the namespace's tracked connections from or to guest ``address`` (so that only the
    current rules decide about its next packet); returns how many were dropped."""
    check_ipv4(address)

    def forget() -> int:
        dropped = 0
        with Conntrack() as ct:
            for entry in _tracked(ct, address):
                try:
                    ct.delete(entry)
                    dropped += 1
                except OSError:  # ended meanwhile
                    pass
        return dropped

    return int(call_in(ns, forget))


def vm_keys(ns: str, table: str = DEFAULT_TABLE) -> set[str]:
    """Keys of the VMs that have rules (for the reconciler to find orphans)."""
    keys: set[str] = set()
    for item in _list_json(ns, "table", "inet", _check_table(table)):
        name = item.get("chain", {}).get("name", "")
        match = re.fullmatch(r"vm_([a-z0-9_]+)_fwd", name)
        if match:
            keys.add(match.group(1))
    return keys


def read_refused(
    ns: str, key: str, table: str = DEFAULT_TABLE
) -> list[tuple[ipaddress.IPv4Address, str, int, int]]:
    """The VM's refused connections since the last reset: (destination, protocol, port,
    packets), port 0 for protocols without ports. An unknown VM has none."""
    out: list[tuple[ipaddress.IPv4Address, str, int, int]] = []
    for item in _list_json(ns, "set", "inet", _check_table(table), f"vm_{check_key(key)}_refused"):
        for elem in item.get("set", {}).get("elem", []):
            body = elem.get("elem", {}) if isinstance(elem, dict) else {}
            dst, proto, port = body["val"]["concat"]
            packets = int(body.get("counter", {}).get("packets", 0))
            out.append((ipaddress.IPv4Address(dst), str(proto), int(port), packets))
    return sorted(out, key=lambda row: (row[0], row[1], row[2]))


def reset_refused(ns: str, key: str, table: str = DEFAULT_TABLE) -> None:
    """Forget the VM's refused counters (after they were read and recorded). Packets refused
    between the read and the reset are lost to the count; they are still refused."""
    load(ns, f"flush set inet {_check_table(table)} vm_{check_key(key)}_refused\n")
