"""A laboratory of network namespaces for the host plumbing tests.

Every test gets its own namespaces, named with a random test prefix and removed afterwards even
when the test fails: the product namespace, a "host" namespace standing in for the machine's own
(the real host namespace is never touched), an "internet" namespace behind the product's uplink
(with a DNS server and TCP servers on documentation addresses), and one namespace per "guest",
joined to a bridge by a veth pair as a TAP would be. Traffic never leaves these namespaces.
"""

from __future__ import annotations

import contextlib
import ipaddress as ia
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vms.network import bridge as br
from vms.network import dns, netns, ruleset

# Suites of this directory run as root (network namespaces); see docs/networking.md.
HOST_LINK = ia.IPv4Network("10.254.0.0/30")
UPLINK = ia.IPv4Network("10.253.0.0/30")  # product side .1 ("up0"), internet side .2
INTERNET_DNS = ia.IPv4Address("198.51.100.53")
APP_ADDRESS = ia.IPv4Address("198.51.100.80")  # what app.example.test resolves to
ALLOWED_HOST = ia.IPv4Address("203.0.113.10")
OTHER_HOST = ia.IPv4Address("203.0.113.20")
APP_DOMAIN = "app.example.test"

SERVER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)
    print("ready", flush=True)
    while True:
        c, peer = s.accept()
        c.sendall(("ok " + peer[0] + "\\n").encode()); c.close()
    """
)


@dataclass
class Guest:
    ns: str
    port: str  # the bridge port in the product namespace (stands in for a TAP)
    address: ia.IPv4Address
    mac: str
    bridge: br.Bridge


@dataclass
class Lab:
    prefix: str
    product: str
    host: str
    internet: str
    link: netns.HostLink
    run_dir: Path
    namespaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    bridges: list[br.Bridge] = field(default_factory=list)
    _guests: int = 0

    @property
    def fabric(self) -> ruleset.Fabric:
        return ruleset.Fabric.for_link(self.link, [b.ifname for b in self.bridges])

    def network(self, ifname: str, subnet: str, *, isolated: bool) -> br.Bridge:
        net = ia.IPv4Network(subnet)
        bridge = br.Bridge(ifname, net, net.network_address + 1, isolated=isolated)
        br.ensure_bridge(self.product, bridge)
        self.bridges.append(bridge)
        netns.set_host_routes(
            self.product, self.link, [b.subnet for b in self.bridges], host_ns=self.host
        )
        ruleset.apply_base(self.product, self.fabric)
        return bridge

    def guest(self, bridge: br.Bridge, host_index: int) -> Guest:
        self._guests += 1
        name = f"{self.prefix}-g{self._guests}"
        _new_ns(self, name)
        port = f"gp{self._guests}"
        with netns.iproute(self.product) as ipr:
            ipr.link(
                "add",
                ifname=port,
                kind="veth",
                peer={"ifname": "eth0", "net_ns_fd": f"/run/netns/{name}"},
            )
        br.attach(self.product, port, bridge)
        address = bridge.subnet.network_address + host_index
        with netns.iproute(name) as ipr:
            (idx,) = ipr.link_lookup(ifname="eth0")
            ipr.addr("add", index=idx, address=str(address), prefixlen=bridge.subnet.prefixlen)
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=str(bridge.gateway))
            mac = ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS")
        return Guest(name, port, address, mac, bridge)

    def rules(self, guest: Guest, key: str, **kwargs: object) -> ruleset.VmRules:
        vm = ruleset.VmRules(
            key=key,
            bridge=guest.bridge,
            address=guest.address,
            port_ifname=guest.port,
            mac=guest.mac,
            **kwargs,  # type: ignore[arg-type]
        )
        ruleset.apply_vm(self.product, self.fabric, vm)
        return vm

    def serve(self, ns: str, address: ia.IPv4Address | str, port: int) -> None:
        """A TCP server in ``ns`` that answers "ok <peer address>" and closes."""
        proc = subprocess.Popen(  # noqa: S603 - fixed argv
            [
                "/usr/sbin/ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-c",
                SERVER,
                str(address),
                str(port),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.processes.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == b"ready", proc.stderr.read() if proc.stderr else line

    def ruleset_text(self) -> str:
        return netns.run(self.product, ["/usr/sbin/nft", "list", "ruleset"]).stdout.decode()


def in_ns(ns: str, fn):  # type: ignore[no-untyped-def]
    """Run ``fn()`` on a thread inside namespace ``ns`` and return its result (or raise)."""
    return netns.call_in(ns, fn)


def connect(ns: str, address: ia.IPv4Address | str, port: int, timeout: float = 2.0) -> str | None:
    """The server's greeting when a TCP connection from ``ns`` succeeds, else None."""

    def attempt() -> str | None:
        try:
            with socket.create_connection((str(address), port), timeout=timeout) as sock:
                return sock.recv(100).decode().strip()
        except OSError:
            return None

    return in_ns(ns, attempt)  # type: ignore[no-any-return]


def resolve(
    ns: str, server: ia.IPv4Address | str, name: str, port: int = 53
) -> tuple[int, list[str]]:
    """A minimal DNS A query over UDP from ``ns``: (rcode, addresses)."""
    qid = secrets.randbits(16)
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    packet = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", 1, 1)

    def ask() -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(3)
            sock.sendto(packet, (str(server), port))
            return sock.recv(2048)

    reply: bytes = in_ns(ns, ask)
    _, flags, _, ancount, _, _ = struct.unpack("!HHHHHH", reply[:12])
    offset = 12 + len(question) + 4
    addresses = []
    for _ in range(ancount):
        if reply[offset] & 0xC0 == 0xC0:
            offset += 2
        else:
            while reply[offset]:
                offset += reply[offset] + 1
            offset += 1
        rtype, _, _, rdlength = struct.unpack("!HHIH", reply[offset : offset + 10])
        offset += 10
        if rtype == 1:
            addresses.append(socket.inet_ntoa(reply[offset : offset + rdlength]))
        offset += rdlength
    return flags & 0xF, addresses


def _new_ns(lab: Lab, name: str) -> None:
    netns.create(name)
    lab.namespaces.append(name)


@pytest.fixture
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.fail("the network plumbing tests need root (network namespaces, nftables)")
    prefix = "nt" + secrets.token_hex(3)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    link = netns.HostLink("sbx0", "host0", HOST_LINK)
    lab = Lab(prefix, f"{prefix}-p", f"{prefix}-h", f"{prefix}-i", link, run_dir)
    try:
        for name in (lab.product, lab.host, lab.internet):
            _new_ns(lab, name)
        netns.ensure(lab.product)  # the product's settings (forwarding, no br_netfilter)
        netns.connect_host(lab.product, link, host_ns=lab.host)
        # The uplink: a veth to the internet namespace, which routes everything back to it.
        with netns.iproute(lab.product) as ipr:
            ipr.link(
                "add",
                ifname="up0",
                kind="veth",
                peer={"ifname": "eth0", "net_ns_fd": f"/run/netns/{lab.internet}"},
            )
            (idx,) = ipr.link_lookup(ifname="up0")
            ipr.addr("add", index=idx, address=str(UPLINK.network_address + 1), prefixlen=30)
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=str(UPLINK.network_address + 2))
        with netns.iproute(lab.internet) as ipr:
            (idx,) = ipr.link_lookup(ifname="eth0")
            ipr.addr("add", index=idx, address=str(UPLINK.network_address + 2), prefixlen=30)
            ipr.link("set", index=idx, state="up")
            (lo,) = ipr.link_lookup(ifname="lo")
            ipr.link("set", index=lo, state="up")
            for address in (INTERNET_DNS, APP_ADDRESS, ALLOWED_HOST, OTHER_HOST):
                ipr.addr("add", index=lo, address=str(address), prefixlen=32)
            ipr.route("add", dst="0.0.0.0/0", gateway=str(UPLINK.network_address + 1))
        with netns.iproute(lab.host) as ipr:
            (lo,) = ipr.link_lookup(ifname="lo")
            ipr.link("set", index=lo, state="up")
        ruleset.apply_base(lab.product, lab.fabric)
        yield lab
    finally:
        for proc in lab.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        _stop_resolvers(lab.run_dir)
        for name in lab.namespaces:
            netns.remove(name)
        shutil.rmtree(run_dir, ignore_errors=True)


def _stop_resolvers(run_dir: Path) -> None:
    for pidfile in run_dir.glob("dns-*.pid"):
        dns.stop(run_dir, pidfile.stem.removeprefix("dns-"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and list(run_dir.glob("dns-*.pid")):
        time.sleep(0.05)


@pytest.fixture
def internet_dns(lab: Lab) -> ia.IPv4Address:
    """A DNS server in the internet namespace that knows app.example.test."""
    proc = subprocess.Popen(  # noqa: S603 - fixed argv
        [
            "/usr/sbin/ip",
            "netns",
            "exec",
            lab.internet,
            "/usr/sbin/dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            f"--listen-address={INTERNET_DNS}",
            "--port=53",
            "--cache-size=0",
            f"--address=/{APP_DOMAIN}/{APP_ADDRESS}",
            "--address=/other.example.test/203.0.113.20",
            f"--pid-file={lab.run_dir}/internet-dns.pid",
            "--log-facility=-",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lab.processes.append(proc)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if resolve(lab.internet, INTERNET_DNS, APP_DOMAIN)[1] == [str(APP_ADDRESS)]:
                return INTERNET_DNS
        except OSError:
            time.sleep(0.05)
    pytest.fail("the internet namespace's DNS server did not answer")
