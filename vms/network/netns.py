"""The product's network namespace and its link to the host.

All sandbox networking lives in one namespace of the product's own (its name comes from the
settings). The only things ever added to the host's namespace are one end of a veth pair, its
address and a route per sandbox subnet through the other end; bridges, TAPs, rules and the
resolvers stay inside. Tests pass a namespace of their own as the "host" so that nothing here
touches the machine's interfaces.

Namespaces are the named ones of ``ip netns`` (``/run/netns/<name>``), so operators can look with
``ip -n <name> ...`` and ``ip netns exec <name> nft list ruleset``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from .names import NetworkError, check_ifname, check_ipv4_network, check_netns

__all__ = [
    "NETNS_DIR",
    "HostLink",
    "call_in",
    "connect_host",
    "create",
    "disconnect_host",
    "ensure",
    "exists",
    "inside",
    "iproute",
    "remove",
    "run",
    "set_host_routes",
    "submit",
    "sysctl",
    "teardown",
]

T = TypeVar("T")

NETNS_DIR = Path("/run/netns")
# Programs run inside a namespace get a bounded time: nft and ip answer in milliseconds, so a
# stuck one is a fault to report, not something to wait for.
RUN_TIMEOUT_S = 30.0


def exists(name: str) -> bool:
    return (NETNS_DIR / check_netns(name)).exists()


def create(name: str) -> None:
    """Create the namespace; an existing one is an error (see ``ensure``)."""
    if exists(name):
        raise NetworkError(f"network namespace {name} exists")
    pr_netns.create(name)
    _prepare(name)


def ensure(name: str) -> bool:
    """Create the namespace when missing and (re)apply its settings; True when it was created."""
    created = not exists(name)
    if created:
        pr_netns.create(name)
    _prepare(name)
    return created


def remove(name: str) -> None:
    """Remove the namespace's name. The kernel destroys the namespace and its interfaces (a
    veth's peer in another namespace too) once nothing uses it, in the background: a veth end in
    the host may outlive this call for a while. ``teardown`` removes the link first."""
    if exists(name):
        pr_netns.remove(name)


def teardown(name: str, link: HostLink | None = None, *, host_ns: str | None = None) -> None:
    """Remove the product namespace and, first and synchronously, its link to the host (so the
    host is clean when this returns). Stop the resolvers before: a process inside keeps the
    namespace alive."""
    if link is not None:
        disconnect_host(link, host_ns=host_ns)
    remove(name)


def _prepare(name: str) -> None:
    # Routing between the bridges and the uplink happens here, so forwarding is on (a per-namespace
    # setting: the host's own stays as it is). Bridged frames must not go through the inet hooks
    # (br_netfilter turns that on in every new namespace): the inet table decides about routed
    # traffic only, and two guests on one network talk at layer 2 when the network allows it.
    with iproute(name) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    sysctl(name, "net/ipv4/ip_forward", "1")
    for key in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables", "bridge-nf-call-arptables"):
        with contextlib.suppress(FileNotFoundError):
            sysctl(name, f"net/bridge/{key}", "0")
    # Guests get IPv4 only; no IPv6 address appears on the product's interfaces (so no
    # link-local path around the IPv4 rules).
    sysctl(name, "net/ipv6/conf/all/disable_ipv6", "1")
    sysctl(name, "net/ipv6/conf/default/disable_ipv6", "1")


@contextlib.contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the body with the calling thread in namespace ``name``; sockets opened in the body stay
    in that namespace after it ends. Only this thread moves (setns(2) acts on the calling thread),
    so run it on a thread of its own in a server process; the previous namespace is restored even
    when the body raises."""
    target = NETNS_DIR / check_netns(name)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        pr_netns.setns(str(target), flags=0)
        try:
            yield
        finally:
            pr_netns.setns(own, flags=0)
    finally:
        os.close(own)


def call_in(name: str, fn: Callable[[], T]) -> T:
    """``fn()`` run on a short-lived thread inside namespace ``name``; its result, or its
    exception raised here. The caller's own threads never change namespace."""
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            with inside(name):
                result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{name}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


_residents_lock = threading.Lock()
# Per namespace name: the identity (device, inode) of the namespace its thread entered, and the
# executor of that thread.
_residents: dict[str, tuple[tuple[int, int], ThreadPoolExecutor]] = {}


def submit(name: str, fn: Callable[[], T]) -> Future[T]:
    """``fn()`` run on a thread of this process that lives inside namespace ``name`` for good:
    the cheap way for a server to open many sockets there (``call_in`` starts a thread per
    call). One thread per namespace, started on first use; a namespace removed and made again
    under the same name gets a new one (the old thread would still be in the old namespace)."""
    path = NETNS_DIR / check_netns(name)
    try:
        found = path.stat()
    except FileNotFoundError:
        raise NetworkError(f"network namespace {name} does not exist") from None
    identity = (found.st_dev, found.st_ino)
    with _residents_lock:
        known = _residents.get(name)
        if known is None or known[0] != identity:
            if known is not None:
                known[1].shutdown(wait=False)
            executor = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=f"netns-{name}",
                initializer=pr_netns.setns,  # this thread only, and never back
                initargs=(str(path), 0),
            )
            _residents[name] = (identity, executor)
        else:
            executor = known[1]
    return executor.submit(fn)


def sysctl(name: str, key: str, value: str) -> None:
    """Write a per-namespace sysctl (``key`` as a path below /proc/sys/net-style ``net/...``).
    The file is opened from a thread inside the namespace: /proc/sys/net shows the namespace of
    the task that opens it."""
    if (
        not key.startswith("net/")
        or ".." in key
        or not all(part.replace("-", "").replace("_", "").isalnum() for part in key.split("/"))
    ):
        raise NetworkError(f"invalid sysctl key: {key!r}")

    def write() -> None:
        with open(f"/proc/sys/{key}", "w") as fh:
            fh.write(value)

    call_in(name, write)


def iproute(name: str | None) -> IPRoute:
    """A netlink socket in namespace ``name`` (None: the namespace of this process)."""
    if name is None:
        return IPRoute()
    check_netns(name)
    if not exists(name):
        raise NetworkError(f"network namespace {name} does not exist")
    return IPRoute(netns=name)


def run(
    name: str, argv: Sequence[str], *, input: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` inside the namespace (``ip netns exec``), never through a shell. The program
    gets the namespace's own /etc/netns view and sysfs, as ``ip netns exec`` arranges."""
    check_netns(name)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise NetworkError("argv must be a non-empty list of strings")
    result = subprocess.run(  # noqa: S603 - fixed argv, no shell
        ["/usr/sbin/ip", "netns", "exec", name, *argv],
        input=input,
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    if check and result.returncode != 0:
        raise NetworkError(
            f"{argv[0]} in {name} failed ({result.returncode}): "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    return result


@dataclass(frozen=True)
class HostLink:
    """The veth pair between the host namespace and the product's: ``host_ifname`` stays in the
    host, ``ns_ifname`` in the product namespace. ``subnet`` is a small link network (a /30 is
    enough): its first address goes to the host side, the second to the namespace side."""

    host_ifname: str
    ns_ifname: str
    subnet: ipaddress.IPv4Network

    def __post_init__(self) -> None:
        check_ifname(self.host_ifname)
        check_ifname(self.ns_ifname)
        check_ipv4_network(self.subnet)
        if self.subnet.num_addresses < 4 or not self.subnet.is_private:
            raise NetworkError("the host link needs a private subnet of at least 4 addresses")

    @property
    def host_address(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    @property
    def ns_address(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 2


def connect_host(
    name: str,
    link: HostLink,
    sandbox_subnets: Sequence[ipaddress.IPv4Network] = (),
    *,
    host_ns: str | None = None,
) -> None:
    """Create (or complete) the veth pair between ``host_ns`` (None: this process's namespace,
    the real host) and namespace ``name``, address both ends and route ``sandbox_subnets`` from
    the host through the namespace side. Idempotent: an existing pair is kept and completed."""
    check_netns(name)
    with iproute(host_ns) as host:
        if not host.link_lookup(ifname=link.host_ifname):
            with iproute(name) as ns:
                if ns.link_lookup(ifname=link.ns_ifname):
                    raise NetworkError(f"{link.ns_ifname} exists in {name} without its host side")
            host.link(
                "add",
                ifname=link.host_ifname,
                kind="veth",
                peer={"ifname": link.ns_ifname, "net_ns_fd": str(NETNS_DIR / name)},
            )
        (hidx,) = host.link_lookup(ifname=link.host_ifname)
        _ensure_address(host, hidx, link.host_address, link.subnet.prefixlen)
        host.link("set", index=hidx, state="up")
    with iproute(name) as ns:
        found = ns.link_lookup(ifname=link.ns_ifname)
        if not found:
            raise NetworkError(f"{link.ns_ifname} is not in {name}")
        _ensure_address(ns, found[0], link.ns_address, link.subnet.prefixlen)
        ns.link("set", index=found[0], state="up")
    set_host_routes(name, link, sandbox_subnets, host_ns=host_ns)


def set_host_routes(
    name: str,
    link: HostLink,
    sandbox_subnets: Sequence[ipaddress.IPv4Network],
    *,
    host_ns: str | None = None,
) -> None:
    """Make the host's routes through the veth exactly ``sandbox_subnets``: missing ones are
    added, routes through the link to subnets no longer listed are removed."""
    wanted = {check_ipv4_network(s) for s in sandbox_subnets}
    with iproute(host_ns) as host:
        found = host.link_lookup(ifname=link.host_ifname)
        if not found:
            raise NetworkError(f"{link.host_ifname} does not exist")
        present: set[ipaddress.IPv4Network] = set()
        for route in host.get_routes(family=2, oif=found[0]):
            gateway = route.get_attr("RTA_GATEWAY")
            if gateway != str(link.ns_address):
                continue
            dst = route.get_attr("RTA_DST")
            if dst is None:  # a default route through the link: not one of ours
                continue
            present.add(ipaddress.IPv4Network(f"{dst}/{route['dst_len']}"))
        for subnet in wanted - present:
            host.route("replace", dst=str(subnet), gateway=str(link.ns_address), oif=found[0])
        for subnet in present - wanted:
            host.route("del", dst=str(subnet), gateway=str(link.ns_address), oif=found[0])


def disconnect_host(link: HostLink, *, host_ns: str | None = None) -> None:
    """Remove the host side of the pair (its routes and the peer go with it)."""
    with iproute(host_ns) as host:
        found = host.link_lookup(ifname=link.host_ifname)
        if found:
            host.link("del", index=found[0])


def _ensure_address(ipr: IPRoute, index: int, address: ipaddress.IPv4Address, prefix: int) -> None:
    for msg in ipr.get_addr(family=2, index=index):
        if msg.get_attr("IFA_ADDRESS") == str(address) and msg["prefixlen"] == prefix:
            return
    ipr.addr("add", index=index, address=str(address), prefixlen=prefix)
