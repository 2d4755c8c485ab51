"""VM rows to host networking: what the worker, the reconciler and the network tasks call.

Reads the read models (a VM's network, address, MAC, TAP, egress policy, allow list and
forwards; every network's bridge) and hands them to ``vms.netplumb`` as plain values. A VM
without a network (or a host with networking off) has no NIC: every function here is then a
no-op that returns nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import uuid
from collections.abc import Iterable

from django.conf import settings
from django.db import close_old_connections

from vms import commands, identity, lifecycle, netplumb
from vms.hypervisors.base import NetSpec
from vms.models import Network, PoolMember, PortForward, VirtualMachine
from vms.network import bridge as br
from vms.network import netns, ruleset, tap

log = logging.getLogger("sandbox.vms.network")

__all__ = [
    "attach_begin",
    "bridge_of",
    "bridges",
    "close_fds",
    "collect_evidence",
    "has_nic",
    "host",
    "join_plugged",
    "member_nic",
    "member_taps",
    "namespace_in_place",
    "netspecs",
    "network_in_place",
    "plan_for",
    "plug",
    "plug_begin",
    "reapply",
    "remove_orphans",
    "setup",
    "teardown_if_idle",
    "unplug",
    "unplug_member",
    "wait_plugged",
    "wanted_forwards",
]

# States in which a VM's NIC is plugged (its VMM runs, or is being started or torn down).
PLUGGED_STATES = (
    "starting",
    "running",
    "stopping",
    "pausing",
    "paused",
    "resuming",
    "rebooting",
    "resizing",
    "snapshotting",
    "restoring",
    "destroying",
)


def host() -> netplumb.HostNet | None:
    return netplumb.host_config()


def bridge_of(network: Network) -> br.Bridge:
    return br.Bridge(
        network.bridge,
        ipaddress.IPv4Network(network.subnet),
        ipaddress.IPv4Address(network.gateway),
        isolated=network.isolated,
    )


def bridges() -> list[br.Bridge]:
    return [bridge_of(n) for n in Network.objects.order_by("created_at")]


def _split_allow(
    entries: Iterable[str],
) -> tuple[tuple[ipaddress.IPv4Network, ...], tuple[str, ...]]:
    cidrs: list[ipaddress.IPv4Network] = []
    domains: list[str] = []
    for entry in entries:
        try:
            net = ipaddress.ip_network(entry)
        except ValueError:
            domains.append(entry)
            continue
        if isinstance(net, ipaddress.IPv4Network):
            cidrs.append(net)
    return tuple(cidrs), tuple(domains)


def plan_for(vm: VirtualMachine) -> netplumb.NicPlan | None:
    """The VM's NIC as the host sees it, or None when it has none."""
    network = vm.network
    if network is None or not vm.ip or not vm.tap:
        return None
    cidrs, domains = _split_allow(vm.egress_allow or ())
    forwards = tuple(
        ruleset.Forward(f.protocol, f.host_port, f.guest_port)  # type: ignore[arg-type]
        for f in PortForward.objects.filter(vm=vm).order_by("host_port")
    )
    return netplumb.NicPlan(
        key=vm.pk.hex,
        tap=vm.tap,
        mac=vm.mac,
        address=ipaddress.IPv4Address(vm.ip),
        bridge=bridge_of(network),
        egress=vm.egress or "none",  # type: ignore[arg-type]
        allow_cidrs=cidrs,
        allow_domains=domains,
        forwards=forwards,
    )


def setup() -> netplumb.HostNet | None:
    """At worker start: the namespace, its link, the bridges and the base rules."""
    hn = host()
    if hn is None:
        return None
    created = netplumb.setup_host(hn, bridges())
    log.info("network namespace %s %s", hn.netns, "created" if created else "taken over")
    return hn


def plug(vm: VirtualMachine) -> tuple[NetSpec, ...]:
    """Before the VM's VMM starts: its NIC, with an open TAP descriptor (``close_fds`` once the
    VMM runs). Nothing for a VM without a NIC."""
    found = _nic_here(vm)
    if found is None:
        return ()
    hn, plan = found
    return (netplumb.plug(hn, bridges(), plan),)


def _nic_here(vm: VirtualMachine) -> tuple[netplumb.HostNet, netplumb.NicPlan] | None:
    """This host's networking and the VM's NIC, when a start here gives it one (no forwards
    are read where VMs get no NIC)."""
    hn = host()
    plan = plan_for(vm) if hn is not None else None
    return None if hn is None or plan is None else (hn, plan)


def has_nic(vm: VirtualMachine) -> bool:
    """Whether a start of the VM on this host gets a NIC (networking on, and the VM has one)."""
    return _nic_here(vm) is not None


def plug_begin(vm: VirtualMachine) -> tuple[netplumb.Plugging, ...]:
    """As ``plug``, with the NIC's bridge port, resolver and rules still being set up on a
    thread when this returns (``wait_plugged`` before the guest's link comes up, ``join_plugged``
    in any case before going on)."""
    found = _nic_here(vm)
    if found is None:
        return ()
    hn, plan = found
    return (netplumb.plug_begin(hn, bridges(), plan),)


# --- Warm pool members (vms.pools) --------------------------------------------------------------
# A member gets its NIC in two steps: at its warm a TAP on no bridge (``member_nic``: the member
# is no VM yet, so it has no network, address or rules), at its hand-out that TAP on its VM's
# bridge with the VM's rules (``attach_begin``). The TAP is named for the member's id, which is
# its VM's id: it is the VM's TAP (``identity.tap_for``) from the hand-out on.

# The MAC a member's NIC is described with before its restore: the driver puts the saved MAC of
# the template on the device (a restored guest keeps it until its hand-out gives it the VM's).
_MEMBER_MAC = "02:00:00:00:00:01"


def namespace_in_place() -> bool:
    """Whether a hand-out here can plug a member's NIC: networking off (members have none), or
    the product namespace exists (the worker made it)."""
    hn = host()
    return hn is None or netns.exists(hn.netns)


def network_in_place(network: Network) -> bool:
    """Whether a hand-out to a VM of ``network`` can plug its NIC: networking off, or the
    network's bridge exists (the worker makes it, at its start or at its first VM's)."""
    hn = host()
    if hn is None:
        return True
    return netplumb.network_in_place(hn, bridge_of(network))


def member_nic(member_id: uuid.UUID) -> NetSpec | None:
    """The NIC of pool member ``member_id`` for its restore: a TAP of its own in the product
    namespace on no bridge, with an open descriptor (``close_fds`` once the VMM runs); None
    where VMs get no NIC."""
    hn = host()
    if hn is None:
        return None
    name = identity.tap_for(member_id)
    fd = netplumb.open_loose_tap(hn, name)
    return NetSpec(tap=name, mac=_MEMBER_MAC, id="net0", fd=fd, netns=hn.netns)


def attach_begin(vm: VirtualMachine) -> tuple[netplumb.Plugging, ...]:
    """At a hand-out: the member's TAP (the VM's now) on its network's bridge, with the VM's
    rules and resolver, on a thread (``wait_plugged`` before the guest's link comes up,
    ``join_plugged`` in any case). Nothing for a VM without a NIC."""
    found = _nic_here(vm)
    if found is None:
        return ()
    hn, plan = found
    return (netplumb.attach_begin(hn, bridges(), plan),)


def unplug_member(member_id: uuid.UUID) -> list[str]:
    """A member's TAP (and whatever rules or resolver its hand-out had set up) goes."""
    hn = host()
    if hn is None:
        return []
    return netplumb.unplug(hn, member_id.hex, identity.tap_for(member_id))


def member_taps() -> set[str] | None:
    """The TAPs of the product namespace (what the refill checks members against); None where
    VMs get no NIC."""
    hn = host()
    if hn is None:
        return None
    if not netns.exists(hn.netns):
        return set()
    return set(tap.list_taps(hn.netns, "t"))


def wait_plugged(pluggings: Iterable[netplumb.Plugging]) -> None:
    for plugging in pluggings:
        plugging.wait()


def join_plugged(pluggings: Iterable[netplumb.Plugging]) -> None:
    for plugging in pluggings:
        plugging.join()


def netspecs(vm: VirtualMachine) -> tuple[NetSpec, ...]:
    """The VM's NICs as the guest sees them (no descriptor): for configuring a running guest."""
    found = _nic_here(vm)
    if found is None:
        return ()
    hn, plan = found
    return (plan.netspec(hn, None),)


def close_fds(nets: Iterable[NetSpec]) -> None:
    for net in nets:
        if net.fd is not None:
            with contextlib.suppress(OSError):
                os.close(net.fd)


def unplug(vm: VirtualMachine) -> list[str]:
    """When the VM's VMM goes: its last evidence, then its rules, resolver and TAP."""
    hn = host()
    if hn is None or not vm.tap:
        return []
    if vm.network_id is not None:
        with contextlib.suppress(Exception):
            _record_evidence(hn, vm)
    errors = netplumb.unplug(hn, vm.pk.hex, vm.tap)
    netplumb.forget_evidence(hn, vm.pk.hex)
    return errors


def reapply(vm_id: str) -> str:
    """The VM's rules after a forward or its egress policy changed (only while plugged)."""
    hn = host()
    vm = VirtualMachine.objects.select_related("network").filter(pk=vm_id).first()
    if hn is None or vm is None:
        return "no networking" if hn is None else "no such VM"
    plan = plan_for(vm)
    if plan is None or vm.state not in PLUGGED_STATES:
        return "not plugged"
    if vm.pk.hex not in ruleset.vm_keys(hn.netns, hn.table):
        return "not plugged"
    # Always drop tracked connections: a removed forward or a narrower policy must cut what it
    # allowed (a wider one loses nothing but connections the guest re-opens).
    netplumb.reapply(hn, bridges(), plan, stricter=True)
    return "applied"


def apply_network_settings(network_id: str) -> str:
    """A network's isolation again on its bridge (every port) and in the base rules, when its
    bridge is in place; a network not in place gets it when its first VM starts."""
    hn = host()
    network = Network.objects.filter(pk=network_id).first()
    if hn is None or network is None:
        return "no networking" if hn is None else "no such network"
    if not netplumb.network_in_place(hn, bridge_of(network)):
        return "not in place"
    netplumb.ensure_network(hn, bridges(), bridge_of(network))
    return "applied"


def wanted_forwards() -> set[tuple[str, int]]:
    """(protocol, host port) of every forward of a VM whose NIC is plugged: the forwarder's
    listeners. Runs on the forwarder's threads: stale connections are dropped first."""
    close_old_connections()
    rows = PortForward.objects.filter(vm__state__in=PLUGGED_STATES).values_list(
        "protocol", "host_port"
    )
    return {(proto, int(port)) for proto, port in rows}


def teardown_if_idle() -> bool:
    """At worker stop, unless SANDBOX_NETNS_KEEP: remove the namespace when no VM has its NIC
    plugged (running guests keep theirs). True when it was removed."""
    hn = host()
    if hn is None or settings.SANDBOX_NETNS_KEEP:
        return False
    if VirtualMachine.objects.filter(state__in=PLUGGED_STATES).exclude(tap="").exists():
        log.info("network namespace %s kept: VMs still have their NICs", hn.netns)
        return False
    if PoolMember.objects.exists():
        log.info("network namespace %s kept: warm pool members have their TAPs", hn.netns)
        return False
    netplumb.teardown_host(hn)
    return True


def _live() -> tuple[set[str], set[str]]:
    rows = VirtualMachine.objects.exclude(state=lifecycle.GONE).values_list("id", "tap")
    keys, taps = set(), set()
    for pk, tap_name in rows:
        keys.add(pk.hex)
        if tap_name:
            taps.add(tap_name)
    # Warm pool members are VMs to be: their TAPs are no orphans. A member's row exists before
    # its TAP is made and goes in the commit that makes it a VM (whose row names the TAP).
    for pk in PoolMember.objects.values_list("id", flat=True):
        keys.add(pk.hex)
        taps.add(identity.tap_for(pk))
    return keys, taps


def remove_orphans() -> dict[str, int]:
    """TAPs, rules and resolvers of VMs that are not live (the reconciler); a warm pool
    member's TAP is not an orphan."""
    hn = host()
    if hn is None:
        return {}
    return netplumb.remove_orphans(hn, _live)


def _record_evidence(hn: netplumb.HostNet, vm: VirtualMachine) -> bool:
    evidence = netplumb.collect(hn, vm.pk.hex)
    if evidence.empty:
        return False
    commands.record_net_evidence(
        str(vm.pk),
        since=dt.datetime.fromtimestamp(evidence.since, dt.UTC).isoformat(),
        until=dt.datetime.fromtimestamp(evidence.until, dt.UTC).isoformat(),
        refused=evidence.refused,
        lookups_allowed=evidence.allowed_names or None,
        lookups_refused=evidence.refused_names or None,
    )
    return True


def collect_evidence() -> int:
    """Every plugged VM's refused connections and lookups since the last collection, appended
    as evidence events; how many VMs had some."""
    hn = host()
    if hn is None:
        return 0
    recorded = 0
    vms = VirtualMachine.objects.filter(state__in=PLUGGED_STATES).exclude(tap="")
    for vm in vms.exclude(network__isnull=True):
        try:
            recorded += _record_evidence(hn, vm)
        except Exception:  # one VM's failure must not cost the others their evidence
            log.exception("collecting the network evidence of %s failed", vm.pk)
    return recorded
