"""The worker's side of sandbox networking: what a VM's NIC needs on this host, and when.

``vms.network`` is the plumbing (namespace, bridges, rules, resolvers, TAPs) and knows nothing of
VMs as the product sees them. This module turns the product's view (a ``HostNet`` from the
settings, a ``NicPlan`` per VM: its TAP, MAC, address, network, egress policy and forwards) into
calls of that plumbing, in the order the lifecycle needs:

- ``setup_host``: at worker start, the product namespace, its link to the host, the base rules
  and one bridge per network (idempotent: a namespace left by the last run is taken over);
- ``plug``: before a VMM starts, the VM's TAP on its network's bridge, its rules (one
  transaction), its resolver when its policy lets it resolve names, and a ``NetSpec`` holding an
  open descriptor of the TAP for the VMM (the caller closes it once the VMM runs);
  ``plug_begin`` does the same with the bridge port, resolver and rules on a thread, so that
  they are set up while the VMM restores its guest (``Plugging.wait`` before the guest's link
  comes up);
- ``open_loose_tap`` and ``attach_begin``: a warm pool member's NIC in two steps (``vms.pools``):
  at its warm, a TAP on no bridge (the member is no VM yet, and has no address); at its
  hand-out, that TAP on its VM's bridge with its rules and resolver, as ``plug_begin`` does;
- ``reapply``: the VM's rules again after a forward or its egress policy changed;
- ``unplug``: at stop and destroy, the rules, the resolver and the TAP (each step runs even when
  an earlier one failed, and a VM without any of them is fine);
- ``remove_orphans``: TAPs, rules and resolvers of VMs that are no longer live (the reconciler);
- ``collect``: the refused connections and the lookups since the last collection, per VM.

Everything here takes its configuration as arguments (tests pass namespaces of their own); only
``host_config`` reads the settings.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from vms import netconfig
from vms.hypervisors.base import NetSpec
from vms.network import bridge as br
from vms.network import dns, netns, ruleset, tap
from vms.network.names import NetworkError
from vms.network.netns import HostLink

log = logging.getLogger("sandbox.vms.network")

__all__ = [
    "Evidence",
    "HostNet",
    "NicPlan",
    "Plugging",
    "attach_begin",
    "collect",
    "host_config",
    "network_in_place",
    "open_loose_tap",
    "plug",
    "plug_begin",
    "reapply",
    "remove_orphans",
    "setup_host",
    "teardown_host",
    "unplug",
]

Egress = Literal["none", "allow-list", "internet"]
# The namespace side of the host link, inside the product namespace.
NS_LINK_IFNAME = "host0"


@dataclass(frozen=True)
class HostNet:
    """This host's networking: the product namespace ``netns``, its ``link`` to the host (the
    host side in ``host_ns``; None is the real host namespace, tests pass one of their own), the
    directory of the resolvers' files, the ``uplink`` interface egress leaves by (None: guests
    reach nothing outside the namespace whatever their policy), the resolvers' upstream servers
    and the nftables table."""

    netns: str
    link: HostLink
    run_dir: Path
    uplink: str | None = None
    upstreams: tuple[ipaddress.IPv4Address, ...] = ()
    blocked: tuple[ipaddress.IPv4Network, ...] = ()
    table: str = ruleset.DEFAULT_TABLE
    host_ns: str | None = None

    @classmethod
    def make(
        cls,
        name: str,
        link_subnet: str | ipaddress.IPv4Network,
        run_dir: Path,
        **kwargs: object,
    ) -> HostNet:
        """The host side of the link is named after the namespace (so two product namespaces on
        one machine, as in tests, never share a name); the namespace side is ``host0``."""
        link = HostLink(
            host_ifname=f"{name[:13]}-h",
            ns_ifname=NS_LINK_IFNAME,
            subnet=ipaddress.IPv4Network(link_subnet),
        )
        return cls(netns=name, link=link, run_dir=Path(run_dir), **kwargs)  # type: ignore[arg-type]

    def fabric(self, bridges: Iterable[br.Bridge]) -> ruleset.Fabric:
        return ruleset.Fabric.for_link(
            self.link, [b.ifname for b in bridges], self.blocked, self.table
        )


@dataclass(frozen=True)
class NicPlan:
    """One VM's NIC as the host sees it. ``key`` names its rules and resolver (the VM id's hex),
    ``tap`` its TAP, ``bridge`` its network's bridge."""

    key: str
    tap: str
    mac: str
    address: ipaddress.IPv4Address
    bridge: br.Bridge
    egress: Egress = "none"
    allow_cidrs: tuple[ipaddress.IPv4Network, ...] = ()
    allow_domains: tuple[str, ...] = ()
    forwards: tuple[ruleset.Forward, ...] = field(default=())

    def effective_egress(self, host: HostNet) -> Egress:
        # Without an uplink nothing leaves the namespace: the policy is "none" in effect.
        return self.egress if host.uplink else "none"

    def resolver(self, host: HostNet) -> dns.Resolver | None:
        egress = self.effective_egress(host)
        if egress == "none" or not host.upstreams:
            return None
        return dns.Resolver(
            key=self.key,
            gateway=self.bridge.gateway,
            port=dns.resolver_port(self.bridge.subnet, self.address),
            mode=egress,
            upstreams=host.upstreams,
            domains=self.allow_domains if egress == "allow-list" else (),
            table=host.table,
        )

    def rules(self, host: HostNet) -> ruleset.VmRules:
        egress = self.effective_egress(host)
        resolver = self.resolver(host)
        return ruleset.VmRules(
            key=self.key,
            bridge=self.bridge,
            address=self.address,
            port_ifname=self.tap,
            mac=self.mac,
            egress=egress,
            allow_cidrs=self.allow_cidrs if egress == "allow-list" else (),
            uplink=host.uplink if egress != "none" else None,
            dns_port=resolver.port if resolver else None,
            forwards=self.forwards,
        )

    def netspec(self, host: HostNet, fd: int | None) -> NetSpec:
        resolver = self.resolver(host)
        return NetSpec(
            tap=self.tap,
            mac=self.mac,
            id="net0",
            fd=fd,
            netns=host.netns,
            address=f"{self.address}/{self.bridge.subnet.prefixlen}",
            gateway=str(self.bridge.gateway),
            dns=(str(self.bridge.gateway),) if resolver else (),
        )


def host_config() -> HostNet | None:
    """This host's ``HostNet`` from the settings, or None when networking is off."""
    if not netconfig.networking_enabled():
        return None
    if settings.TESTING and not settings.SANDBOX_NET_HOST_NS:
        # Tests never touch the machine's own namespace: their host is a namespace they make.
        raise ImproperlyConfigured(
            "networking under the tests needs SANDBOX_NET_HOST_NS (a namespace of the test's own)"
        )
    upstreams = tuple(
        ipaddress.IPv4Address(part.strip())
        for part in str(settings.SANDBOX_NET_DNS).split(",")
        if part.strip()
    )
    return HostNet.make(
        settings.SANDBOX_NETNS,
        settings.SANDBOX_NET_HOST_LINK,
        Path(settings.SANDBOX_NET_RUN_DIR),
        uplink=settings.SANDBOX_NET_UPLINK or None,
        upstreams=upstreams,
        host_ns=settings.SANDBOX_NET_HOST_NS or None,
    )


# --- host -------------------------------------------------------------------------------------


def setup_host(host: HostNet, bridges: Sequence[br.Bridge]) -> bool:
    """The namespace, its link and routes, the bridges and the base rules; True when the
    namespace was created (False: one left by an earlier run was taken over)."""
    created = netns.ensure(host.netns)
    netns.connect_host(host.netns, host.link, [b.subnet for b in bridges], host_ns=host.host_ns)
    for bridge in bridges:
        br.ensure_bridge(host.netns, bridge)
    ruleset.apply_base(host.netns, host.fabric(bridges))
    host.run_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    _applied[host.netns] = tuple(sorted(bridges, key=lambda b: b.ifname))
    return created


# What this process last applied per namespace (its bridges), so that starting a VM on a network
# that is already in place costs no netlink or nft call beyond a look at the bridge.
_applied: dict[str, tuple[br.Bridge, ...]] = {}
# NICs are plugged from several threads (``plug_begin``): one of them mends a network at a time.
_ensure_lock = threading.Lock()


def ensure_network(host: HostNet, bridges: Sequence[br.Bridge], bridge: br.Bridge) -> None:
    """A network created after the worker started: its bridge, the host's route to it and the
    base rules that name every bridge (re-applying the base keeps every VM's rules). Nothing is
    done when this process already applied these networks and the bridge is there."""
    wanted = tuple(sorted(set(bridges) | {bridge}, key=lambda b: b.ifname))
    with _ensure_lock:
        if _applied.get(host.netns) == wanted and _bridge_present(host, bridge):
            return
        _ensure(host, wanted, bridge)


def _ensure(host: HostNet, wanted: tuple[br.Bridge, ...], bridge: br.Bridge) -> None:
    if not netns.exists(host.netns):
        setup_host(host, wanted)
    else:
        br.ensure_bridge(host.netns, bridge)
        netns.set_host_routes(
            host.netns, host.link, [b.subnet for b in wanted], host_ns=host.host_ns
        )
        ruleset.apply_base(host.netns, host.fabric(wanted))
    _applied[host.netns] = wanted


def network_in_place(host: HostNet, bridge: br.Bridge) -> bool:
    """Whether the product namespace and this network's bridge exist."""
    return _bridge_present(host, bridge)


def _bridge_present(host: HostNet, bridge: br.Bridge) -> bool:
    return br.present(host.netns, bridge.ifname)


def teardown_host(host: HostNet) -> None:
    """Stop every resolver of the namespace, then remove its link and the namespace."""
    for key in dns.resolver_keys(host.run_dir):
        dns.stop(host.run_dir, key)
    _applied.pop(host.netns, None)
    netns.teardown(host.netns, host.link, host_ns=host.host_ns)


# --- VMs --------------------------------------------------------------------------------------


class Plugging:
    """A NIC being plugged (``plug_begin``): its TAP exists and ``netspec`` holds an open
    descriptor of it, so the VMM can start; its bridge port, resolver and rules are being set up
    on a thread meanwhile. ``wait`` returns once they are in place (or raises why not, after
    removing what was set up) and must be called before the guest's link can come up; ``join``
    only waits, for paths that fail anyway."""

    def __init__(self, host: HostNet, nic: NicPlan, netspec: NetSpec, work: Callable[[], None]):
        self.host = host
        self.nic = nic
        self.netspec = netspec
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name=f"plug-{nic.tap}")
        self._thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        t0 = time.monotonic()
        try:
            work()
        except BaseException as exc:  # handed to the thread that waits
            self._error = exc
            unplug(self.host, self.nic.key, self.nic.tap)
        else:
            log.debug(
                "NIC %s on %s in %.3fs", self.nic.tap, self.nic.bridge.ifname, time.monotonic() - t0
            )

    def join(self) -> None:
        self._thread.join()

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def _connect(host: HostNet, bridges: Sequence[br.Bridge], nic: NicPlan) -> None:
    """The NIC's TAP on its bridge, its resolver (or none) and its rules: what a plugging does
    on its thread once the TAP and the bridge exist."""
    br.attach(host.netns, nic.tap, nic.bridge)
    resolver = nic.resolver(host)
    if resolver is not None:
        dns.start(host.netns, resolver, host.run_dir)
    else:
        dns.stop(host.run_dir, nic.key)
    ruleset.apply_vm(host.netns, host.fabric(bridges), nic.rules(host))


def plug_begin(host: HostNet, bridges: Sequence[br.Bridge], nic: NicPlan) -> Plugging:
    """Start plugging VM ``nic``'s NIC: its TAP now (with the descriptor for the VMM), then its
    bridge port, resolver and rules on a thread, so that a VMM restoring a guest (a tenth of a
    second and more) need not wait for them: nothing of the guest reaches the bridge before
    ``Plugging.wait`` returned, since its TAP is not on it. Whatever was set up is removed again
    when a step fails (here: raised; on the thread: by ``wait``)."""
    # The TAP needs only the namespace; the bridge is looked at (and mended) on the thread.
    in_place = netns.exists(host.netns)
    if not in_place:
        ensure_network(host, bridges, nic.bridge)
    try:
        fd = tap.create_and_open(host.netns, nic.tap, replace=True)
    except BaseException:
        unplug(host, nic.key, nic.tap)
        raise

    def connect() -> None:
        if in_place:
            ensure_network(host, bridges, nic.bridge)
        _connect(host, bridges, nic)

    try:
        return Plugging(host, nic, nic.netspec(host, fd), connect)
    except BaseException:
        os.close(fd)
        unplug(host, nic.key, nic.tap)
        raise


def open_loose_tap(host: HostNet, tap_name: str) -> int:
    """A TAP ``tap_name`` in the product namespace on no bridge, and a descriptor of it for a
    VMM (the caller closes it once the VMM runs): a warm pool member's NIC, which reaches
    nothing until ``attach_begin`` puts it on its VM's bridge (the base rules drop what comes
    in on a port of no bridge). A TAP of that name left by an earlier try is replaced."""
    return tap.create_and_open(host.netns, tap_name, replace=True)


def attach_begin(host: HostNet, bridges: Sequence[br.Bridge], nic: NicPlan) -> Plugging:
    """As ``plug_begin`` for a TAP that exists already (``open_loose_tap``: a pool member's,
    whose VMM holds it): its bridge port, resolver and rules on a thread (``Plugging.wait``
    before the guest's link comes up; whatever was set up, the TAP included, is removed when a
    step fails). The NIC's network must be in place (the worker makes bridges and the base
    rules): this runs in the web process, which sets up nothing of the namespace itself."""

    def connect() -> None:
        if not _bridge_present(host, nic.bridge):
            raise NetworkError(f"the bridge {nic.bridge.ifname} of the network is not in place")
        if not tap.exists(host.netns, nic.tap):
            raise NetworkError(f"no TAP {nic.tap} in {host.netns}")
        _connect(host, bridges, nic)

    return Plugging(host, nic, nic.netspec(host, None), connect)


def plug(host: HostNet, bridges: Sequence[br.Bridge], nic: NicPlan) -> NetSpec:
    """Make VM ``nic``'s NIC ready for its VMM: TAP on the bridge, resolver, rules; returns the
    NetSpec with an open descriptor of the TAP (the caller closes it after the VMM started).
    Whatever was set up is removed again when a step fails."""
    plugging = plug_begin(host, bridges, nic)
    try:
        plugging.wait()
    except BaseException:
        if plugging.netspec.fd is not None:
            os.close(plugging.netspec.fd)
        raise
    return plugging.netspec


def reapply(
    host: HostNet, bridges: Sequence[br.Bridge], nic: NicPlan, *, stricter: bool = False
) -> None:
    """The VM's rules (and resolver) again after its forwards or its egress policy changed;
    ``stricter``: its tracked connections are dropped too, so that the new policy decides
    about every further packet."""
    resolver = nic.resolver(host)
    if resolver is not None:
        dns.start(host.netns, resolver, host.run_dir)
    else:
        dns.stop(host.run_dir, nic.key)
    ruleset.apply_vm(host.netns, host.fabric(bridges), nic.rules(host), forget_established=stricter)


def unplug(host: HostNet, key: str, tap_name: str | None) -> list[str]:
    """Remove the VM's rules, resolver and TAP; every step is tried, and the failures are
    returned (logged, never raised: a stop or destroy goes on)."""
    errors: list[str] = []
    if not netns.exists(host.netns):
        return errors
    steps: list[tuple[str, Callable[[], object]]] = [
        ("rules", lambda: ruleset.remove_vm(host.netns, key, host.table)),
        ("resolver", lambda: dns.stop(host.run_dir, key)),
    ]
    if tap_name:
        steps.append(("tap", lambda: tap.delete(host.netns, tap_name)))
    for what, step in steps:
        try:
            step()
        except (NetworkError, OSError) as exc:
            log.warning("unplugging %s: %s failed: %s", key, what, exc)
            errors.append(f"{what}: {exc}")
    return errors


def remove_orphans(
    host: HostNet,
    live: Callable[[], tuple[set[str], set[str]]],
    tap_prefix: str = "t",
) -> dict[str, int]:
    """Remove the TAPs (named with ``tap_prefix``), rules and resolvers of VMs that are not live.
    ``live()`` gives the live VMs' keys and TAPs; it is called after the namespace was listed,
    so a VM whose NIC is being plugged meanwhile (its row exists before its TAP) is live in the
    answer. Returns counts of each. A namespace that does not exist has nothing to clean."""
    counts = {"taps": 0, "rules": 0, "resolvers": 0}
    if not netns.exists(host.netns):
        return counts
    found_taps = tap.list_taps(host.netns, tap_prefix)
    found_keys = ruleset.vm_keys(host.netns, host.table)
    found_resolvers = dns.resolver_keys(host.run_dir)
    keys, taps = live()
    for name in found_taps:
        if name not in taps:
            with contextlib.suppress(NetworkError):
                if tap.delete(host.netns, name):
                    counts["taps"] += 1
    for key in found_keys - keys:
        ruleset.remove_vm(host.netns, key, host.table)
        counts["rules"] += 1
    for key in found_resolvers - keys:
        dns.stop(host.run_dir, key)
        forget_evidence(host, key)
        counts["resolvers"] += 1
    return counts


# --- evidence ---------------------------------------------------------------------------------


@dataclass
class Evidence:
    """What one VM's egress came to between ``since`` and ``until`` (Unix times): refused
    connections as {dst, proto, port, packets} rows (most packets first) and lookups by name
    and verdict. Bounding them for the log is the evidence command's part."""

    since: float
    until: float
    refused: list[dict[str, object]] = field(default_factory=list)
    allowed_names: dict[str, int] = field(default_factory=dict)
    refused_names: dict[str, int] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.refused or self.allowed_names or self.refused_names)


def _cursor_file(host: HostNet, key: str) -> Path:
    return host.run_dir / f"evidence-{key}.json"


def collect(host: HostNet, key: str, *, now: float | None = None) -> Evidence:
    """Read and reset VM ``key``'s refused counters, and read its resolver's log from where the
    last collection stopped. The cursor (log offset, time of the last collection) is kept in a
    file beside the log, since each collection may run in another process."""
    until = time.time() if now is None else now
    cursor = _cursor_file(host, key)
    try:
        state = json.loads(cursor.read_text())
        offset, since = int(state["offset"]), float(state["since"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        offset, since = 0, until
    refused = ruleset.read_refused(host.netns, key, host.table)
    if refused:
        ruleset.reset_refused(host.netns, key, host.table)
    ranked = sorted(refused, key=lambda r: (-r[3], r[0], r[1], r[2]))
    lookups, offset = dns.read_queries(host.run_dir, key, offset)
    cursor.write_text(json.dumps({"offset": offset, "since": until}))
    evidence = Evidence(since=since, until=until)
    evidence.refused = [
        {"dst": str(dst), "proto": proto, "port": port, "packets": packets}
        for dst, proto, port, packets in ranked
    ]
    for lookup in lookups:
        target = evidence.allowed_names if lookup.verdict == "allowed" else evidence.refused_names
        target[lookup.name] = target.get(lookup.name, 0) + 1
    return evidence


def forget_evidence(host: HostNet, key: str) -> None:
    """After the last collection of a VM that was unplugged: its log and cursor go."""
    dns.remove_log(host.run_dir, key)
    _cursor_file(host, key).unlink(missing_ok=True)


def remove_run_dir(host: HostNet) -> None:
    shutil.rmtree(host.run_dir, ignore_errors=True)
