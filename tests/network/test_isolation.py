"""Isolation: who can reach whom inside the product namespace."""

from __future__ import annotations

import ipaddress as ia

from vms.network import bridge as br
from vms.network import netns

from .conftest import ALLOWED_HOST as ALLOWED
from .conftest import HOST_LINK, Lab, connect


def test_two_guests_of_a_network_reach_each_other_when_it_allows_it(lab: Lab) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=False)
    a, b = lab.guest(net, 10), lab.guest(net, 11)
    lab.rules(a, "a")
    lab.rules(b, "b")
    lab.serve(a.ns, a.address, 8000)

    assert connect(b.ns, a.address, 8000) == f"ok {b.address}"
    assert br.port_isolated(lab.product, a.port) is False


def test_two_guests_of_an_isolating_network_do_not_reach_each_other(lab: Lab) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=True)
    a, b = lab.guest(net, 10), lab.guest(net, 11)
    lab.rules(a, "a")
    lab.rules(b, "b", egress="internet", uplink="up0")
    lab.serve(a.ns, a.address, 8000)

    assert br.port_isolated(lab.product, a.port) is True
    assert connect(b.ns, a.address, 8000) is None
    # Nor by a detour through the gateway (the namespace never routes bridge to bridge), even
    # for a guest whose egress is the internet; the attempt is counted.
    netns.run(
        b.ns, ["/usr/sbin/ip", "route", "replace", f"{a.address}/32", "via", str(net.gateway)]
    )
    assert connect(b.ns, a.address, 8000) is None
    from vms.network import ruleset

    assert (a.address, "tcp", 8000) in [r[:3] for r in ruleset.read_refused(lab.product, "b")]


def test_isolation_setting_applies_to_existing_ports(lab: Lab) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=False)
    a, b = lab.guest(net, 10), lab.guest(net, 11)
    lab.rules(a, "a")
    lab.rules(b, "b")
    lab.serve(a.ns, a.address, 8000)
    assert connect(b.ns, a.address, 8000) is not None

    br.ensure_bridge(lab.product, br.Bridge(net.ifname, net.subnet, net.gateway, isolated=True))

    assert connect(b.ns, a.address, 8000) is None


def test_guests_of_two_networks_never_reach_each_other(lab: Lab) -> None:
    one = lab.network("br1", "10.30.0.0/24", isolated=False)
    two = lab.network("br2", "10.31.0.0/24", isolated=False)
    a, b = lab.guest(one, 10), lab.guest(two, 10)
    lab.rules(a, "a", egress="internet", uplink="up0")
    lab.rules(b, "b", egress="internet", uplink="up0")
    lab.serve(a.ns, a.address, 8000)
    lab.serve(b.ns, b.address, 8000)

    assert connect(b.ns, a.address, 8000) is None
    assert connect(a.ns, b.address, 8000) is None


def test_guests_reach_neither_the_namespace_nor_the_host(lab: Lab) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=True)
    a = lab.guest(net, 10)
    lab.rules(a, "a", egress="internet", uplink="up0")
    lab.serve(lab.product, net.gateway, 8080)  # a service of the namespace itself
    lab.serve(lab.host, lab.link.host_address, 8080)  # a service of the host

    assert connect(a.ns, net.gateway, 8080) is None
    assert connect(a.ns, lab.link.ns_address, 8080) is None
    assert connect(a.ns, lab.link.host_address, 8080) is None


def test_the_host_reaches_a_guest_directly(lab: Lab) -> None:
    # The web server's path to a guest's HTTP port (previews): from the host side of the link.
    net = lab.network("br1", "10.30.0.0/24", isolated=True)
    a = lab.guest(net, 10)
    lab.rules(a, "a")
    lab.serve(a.ns, a.address, 8000)

    assert connect(lab.host, a.address, 8000) == f"ok {lab.link.host_address}"


def test_a_guest_cannot_borrow_a_neighbours_address(lab: Lab) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=False)
    a, b = lab.guest(net, 10), lab.guest(net, 11)
    lab.rules(a, "a", egress="internet", uplink="up0")  # the neighbour may go out
    lab.rules(b, "b")  # this one may not
    lab.serve(lab.internet, ALLOWED, 80)
    assert connect(a.ns, ALLOWED, 80) is not None
    assert connect(b.ns, ALLOWED, 80) is None
    # a's NIC goes away while its rules stay (a paused or stopping VM) and b takes its address
    # (its frames still leave by its own port, with its own MAC).
    netns.run(a.ns, ["/usr/sbin/ip", "link", "del", "eth0"])
    netns.run(b.ns, ["/usr/sbin/ip", "addr", "flush", "dev", "eth0"])
    netns.run(b.ns, ["/usr/sbin/ip", "addr", "add", f"{a.address}/24", "dev", "eth0"])
    netns.run(b.ns, ["/usr/sbin/ip", "route", "add", "default", "via", str(net.gateway)])

    assert connect(b.ns, ALLOWED, 80, timeout=1.0) is None


def test_the_host_namespace_only_gets_the_link_and_its_routes(lab: Lab) -> None:
    lab.network("br1", "10.30.0.0/24", isolated=True)
    lab.network("br2", "10.31.0.0/24", isolated=True)
    links = netns.run(lab.host, ["/usr/sbin/ip", "-o", "link"]).stdout.decode()
    routes = netns.run(lab.host, ["/usr/sbin/ip", "route"]).stdout.decode().splitlines()
    rules = netns.run(lab.host, ["/usr/sbin/nft", "list", "ruleset"]).stdout.decode()

    assert sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines()) == [
        "lo",
        "sbx0",
    ]
    assert sorted(r.split()[0] for r in routes) == sorted(
        [str(HOST_LINK), "10.30.0.0/24", "10.31.0.0/24"]
    )
    assert all("via 10.254.0.2" in r for r in routes if not r.startswith(str(HOST_LINK)))
    assert rules.strip() == ""
    assert ia.IPv4Network("10.30.0.0/24")  # the networks' bridges live in the product namespace
    assert "br1" in netns.run(lab.product, ["/usr/sbin/ip", "-o", "link"]).stdout.decode()
