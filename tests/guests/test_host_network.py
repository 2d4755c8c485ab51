"""The worker's networking steps (``vms.netplumb``) with real QEMU guests.

Each test makes a product namespace, a namespace standing in for the host (the real host's
interfaces are never touched) and a host link subnet of its own, all named per run, and removes
them even when it fails. Guests start from a template with their NIC plugged by ``plug`` (its
TAP descriptor handed to QEMU) and get their address from the agent; traffic goes only between
the guests and those namespaces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.network.internet import (
    APP_ADDRESS,
    APP_DOMAIN,
    INTERNET_DNS,
    OTHER_DOMAIN,
    OTHER_HOST,
    UPLINK,
)
from tests.network.internet import internet as the_internet
from vms import forwarder, netplumb
from vms.hypervisors.base import VMSpec
from vms.network import bridge as br
from vms.network import netns, ruleset, tap

from .conftest import Guest

pytestmark = pytest.mark.guest


@dataclass
class Site:
    """A product namespace of the test's own, its stand-in host and its networks."""

    host: netplumb.HostNet
    bridges: list[br.Bridge] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    def network(self, ifname: str, subnet: str, *, isolated: bool) -> br.Bridge:
        net = ipaddress.IPv4Network(subnet)
        bridge = br.Bridge(ifname, net, net.network_address + 1, isolated=isolated)
        self.bridges = [b for b in self.bridges if b.ifname != ifname] + [bridge]
        netplumb.ensure_network(self.host, self.bridges, bridge)
        return bridge

    def nic(self, key: str, bridge: br.Bridge, index: int, **kwargs: object) -> netplumb.NicPlan:
        return netplumb.NicPlan(
            key=key,
            tap=f"t{key[:12]}",
            mac=f"52:54:00:7b:{secrets.randbelow(256):02x}:{index:02x}",
            address=bridge.subnet.network_address + index,
            bridge=bridge,
            **kwargs,  # type: ignore[arg-type]
        )

    def ip_links(self) -> str:
        return _out(["ip", "-n", self.host.netns, "-br", "link"])

    def ruleset(self) -> str:
        return _out(["ip", "netns", "exec", self.host.netns, "nft", "list", "ruleset"])


def _out(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout


@pytest.fixture
def site() -> Iterator[Site]:
    if os.geteuid() != 0:
        pytest.fail("the host networking tests need root (network namespaces, nftables)")
    tag = secrets.token_hex(3)
    name, host_ns = f"nbp{tag}", f"nbh{tag}"
    # A /30 of its own in 10.254.0.0/16 (the test's host is a namespace: no clash possible with
    # the machine, only between concurrent runs, which the random part avoids).
    link = ipaddress.IPv4Network(f"10.254.{secrets.randbelow(256)}.{4 * secrets.randbelow(64)}/30")
    run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    host = netplumb.HostNet.make(name, link, run_dir, host_ns=host_ns)
    s = Site(host)
    try:
        netns.create(host_ns)
        s.namespaces.append(host_ns)
        netplumb.setup_host(host, [])
        s.namespaces.append(name)
        yield s
    finally:
        with contextlib.suppress(Exception):
            netplumb.teardown_host(host)
        for ns in s.namespaces:
            netns.remove(ns)
        shutil.rmtree(run_dir, ignore_errors=True)
    assert not netns.exists(name) and not netns.exists(host_ns)


@pytest.fixture
def start_nic_guest(
    site: Site,
    start_guest: Callable[..., Guest],
    make_spec: Callable[..., VMSpec],
) -> Iterator[Callable[[netplumb.NicPlan], Guest]]:
    started: list[tuple[Guest, netplumb.NicPlan]] = []

    def start(nic: netplumb.NicPlan) -> Guest:
        net = netplumb.plug(site.host, site.bridges, nic)
        try:
            guest = start_guest(nic.key[:12], spec=make_spec(nic.key[:12]).replace(nets=(net,)))
        finally:
            assert net.fd is not None
            os.close(net.fd)
        started.append((guest, nic))
        return guest

    yield start
    for guest, nic in started:
        guest.close()
        netplumb.unplug(site.host, nic.key, nic.tap)


def serve_in_guest(guest: Guest, port: int, text: str) -> threading.Thread:
    """A TCP server started in the guest by exec that sends ``text`` to its first client."""
    flag = f"/run/listening-{port}"
    guest.client.exec(["rm", "-f", flag])
    script = (
        "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
        f"s.bind(('0.0.0.0',{port}));s.listen(1);s.settimeout(30);"
        f"open({flag!r},'w').close();c,_=s.accept();c.sendall({text.encode()!r});c.close()"
    )
    worker = threading.Thread(
        target=guest.client.exec, args=(["python3", "-c", script],), kwargs={"timeout": 60}
    )
    worker.start()
    for _ in range(300):
        if guest.client.exec(["test", "-e", flag]).exit_code == 0:
            return worker
    raise AssertionError("the guest's server did not start")


def guest_reads(guest: Guest, address: ipaddress.IPv4Address, port: int) -> str | None:
    """What a TCP connection from ``guest`` to ``address:port`` reads, None if it fails."""
    script = (
        "import socket,sys\n"
        "try:\n"
        f" s=socket.create_connection(({str(address)!r},{port}),timeout=4)\n"
        " sys.stdout.write(s.recv(100).decode())\n"
        "except OSError as e:\n"
        " sys.exit(7)\n"
    )
    result = guest.client.exec(["python3", "-c", script], timeout=30)
    return result.stdout.decode() if result.exit_code == 0 else None


def test_two_vms_reach_each_other_only_when_their_network_allows_it(
    site: Site, start_nic_guest: Callable[[netplumb.NicPlan], Guest]
) -> None:
    net = site.network("nbr0", "10.219.5.0/24", isolated=False)
    nic_a = site.nic(secrets.token_hex(16), net, 10)
    nic_b = site.nic(secrets.token_hex(16), net, 11)
    a, b = start_nic_guest(nic_a), start_nic_guest(nic_b)

    server = serve_in_guest(a, 8080, "from-a")
    try:
        assert guest_reads(b, nic_a.address, 8080) == "from-a"
    finally:
        server.join(60)

    # The network now isolates its VMs: the ports get the flag, the same guests no longer meet.
    net = site.network("nbr0", "10.219.5.0/24", isolated=True)
    assert br.port_isolated(site.host.netns, nic_a.tap)
    server = serve_in_guest(a, 8081, "from-a")
    try:
        assert guest_reads(b, nic_a.address, 8081) is None
    finally:
        # Let the server's accept time out rather than leave it listening.
        server.join(60)

    # Destroy: nothing of either VM is left in the namespace.
    for guest, nic in ((a, nic_a), (b, nic_b)):
        guest.close()
        assert netplumb.unplug(site.host, nic.key, nic.tap) == []
    links, rules = site.ip_links(), site.ruleset()
    for nic in (nic_a, nic_b):
        assert nic.tap not in links
        assert f"vm_{nic.key}" not in rules
        assert str(nic.address) not in rules
    assert tap.list_taps(site.host.netns) == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _read_local(port: int) -> bytes | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            return sock.recv(100)
    except OSError:
        return None


def test_a_port_forward_reaches_a_service_in_the_guest_and_stops_when_removed(
    site: Site, start_nic_guest: Callable[[netplumb.NicPlan], Guest]
) -> None:
    net = site.network("nbr0", "10.219.6.0/24", isolated=True)
    host_port = _free_port()
    forward = ruleset.Forward("tcp", host_port, 8080)
    nic = site.nic(secrets.token_hex(16), net, 20, forwards=(forward,))
    guest = start_nic_guest(nic)
    fwd = forwarder.Forwarder("127.0.0.1", site.host.link.ns_address, site.host.host_ns)
    stop = threading.Event()
    wanted = {("tcp", host_port)}
    thread = forwarder.run_thread(fwd, lambda: set(wanted), stop, poll_s=0.2)
    try:
        for _ in range(50):
            if fwd.ports == wanted:
                break
            time.sleep(0.1)
        server = serve_in_guest(guest, 8080, "through-the-forward")
        try:
            # From the host's loopback, through the forwarder, the link and the DNAT rule.
            assert _read_local(host_port) == b"through-the-forward"
        finally:
            server.join(60)

        # Removed: the rule goes (re-applied without it) and so does the listener.
        removed = dataclasses.replace(nic, forwards=())
        netplumb.reapply(site.host, site.bridges, removed, stricter=True)
        wanted.clear()
        for _ in range(50):
            if not fwd.ports:
                break
            time.sleep(0.1)
        assert fwd.ports == set()
        assert _read_local(host_port) is None
        # Nor through the link directly (no rule for the port any more).
        server = serve_in_guest(guest, 8080, "late")
        try:

            def direct() -> bytes | None:
                try:
                    with socket.create_connection(
                        (str(site.host.link.ns_address), host_port), timeout=3
                    ) as sock:
                        return sock.recv(100)
                except OSError:
                    return None

            assert netns.call_in(site.host.host_ns or "", direct) is None
            assert f"dport {host_port}" not in site.ruleset()
        finally:
            # Reach the server from inside the product namespace so that its accept returns.
            netns.call_in(
                site.host.netns,
                lambda: socket.create_connection((str(nic.address), 8080), timeout=5).close(),
            )
            server.join(60)
    finally:
        stop.set()
        thread.join(10)


@pytest.fixture
def internet(site: Site) -> Iterator[None]:
    """The test's "internet" behind the uplink; the site's host gets the uplink and its DNS
    server as the resolvers' upstream."""
    with the_internet(site.host.netns, site.host.netns.replace("nbp", "nbi"), site.host.run_dir):
        site.host = dataclasses.replace(site.host, uplink=UPLINK, upstreams=(INTERNET_DNS,))
        yield


def guest_fetch(guest: Guest, target: str) -> str | None:
    """From the guest: resolve ``target`` (a name or an address) and read what its port 80
    sends; "nxdomain" when the name does not resolve, None when the connection fails."""
    script = (
        "import socket,sys\n"
        "try:\n"
        f" a=socket.gethostbyname({target!r})\n"
        "except OSError:\n"
        " print('nxdomain'); sys.exit(0)\n"
        "try:\n"
        " s=socket.create_connection((a,80),timeout=4); print(s.recv(100).decode().strip())\n"
        "except OSError:\n"
        " sys.exit(7)\n"
    )
    result = guest.client.exec(["python3", "-c", script], timeout=30)
    return result.stdout.decode().strip() if result.exit_code == 0 else None


def test_egress_none_blocks_the_internet_and_an_allow_list_lets_only_its_names_through(
    site: Site,
    internet: None,
    start_nic_guest: Callable[[netplumb.NicPlan], Guest],
) -> None:
    net = site.network("nbr0", "10.219.7.0/24", isolated=True)
    closed = site.nic(secrets.token_hex(16), net, 30, egress="none")
    allowed = site.nic(
        secrets.token_hex(16), net, 31, egress="allow-list", allow_domains=(APP_DOMAIN,)
    )
    a, b = start_nic_guest(closed), start_nic_guest(allowed)

    assert guest_fetch(a, str(APP_ADDRESS)) is None
    # Masqueraded behind the uplink: the server sees the product namespace's address.
    assert (guest_fetch(b, APP_DOMAIN) or "").startswith("ok 10.253.")
    assert guest_fetch(b, str(OTHER_HOST)) is None
    assert guest_fetch(b, OTHER_DOMAIN) == "nxdomain"

    none_evidence = netplumb.collect(site.host, closed.key)
    assert {"dst": str(APP_ADDRESS), "proto": "tcp", "port": 80} in [
        {k: r[k] for k in ("dst", "proto", "port")} for r in none_evidence.refused
    ]
    evidence = netplumb.collect(site.host, allowed.key)
    assert [(r["dst"], r["proto"], r["port"]) for r in evidence.refused] == [
        (str(OTHER_HOST), "tcp", 80)
    ]
    assert evidence.allowed_names.get(APP_DOMAIN, 0) >= 1
    assert evidence.refused_names.get(OTHER_DOMAIN, 0) >= 1
    # Collected once: the next collection starts after it.
    again = netplumb.collect(site.host, allowed.key)
    assert again.empty and again.since == evidence.until
