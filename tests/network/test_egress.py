"""Egress policy per VM: none, allow-list (CIDRs and resolved names), internet; refused
connections counted per VM and destination; allowed and refused lookups in the resolver's log."""

from __future__ import annotations

import ipaddress as ia

from vms.network import dns, ruleset

from .conftest import (
    ALLOWED_HOST,
    APP_ADDRESS,
    APP_DOMAIN,
    OTHER_HOST,
    UPLINK,
    Lab,
    connect,
    resolve,
)

MASQUERADED = f"ok {UPLINK.network_address + 1}"


def test_egress_none_blocks_the_internet_and_counts_the_attempts(lab: Lab) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=True)
    a = lab.guest(net, 10)
    lab.rules(a, "a", egress="none")
    lab.serve(lab.internet, ALLOWED_HOST, 80)

    assert connect(a.ns, ALLOWED_HOST, 80) is None
    assert connect(a.ns, ALLOWED_HOST, 80) is None

    refused = ruleset.read_refused(lab.product, "a")
    assert refused == [(ALLOWED_HOST, "tcp", 80, 2)]
    ruleset.reset_refused(lab.product, "a")
    assert ruleset.read_refused(lab.product, "a") == []


def test_egress_none_has_no_resolver(lab: Lab) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=True)
    a = lab.guest(net, 10)
    lab.rules(a, "a", egress="none")

    try:
        resolve(a.ns, net.gateway, APP_DOMAIN)
        answered = True
    except OSError:
        answered = False

    assert answered is False
    assert (net.gateway, "udp", 53) in [r[:3] for r in ruleset.read_refused(lab.product, "a")]


def test_allow_list_lets_a_cidr_through_and_not_another_address(lab: Lab) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=True)
    a = lab.guest(net, 10)
    lab.rules(
        a,
        "a",
        egress="allow-list",
        uplink="up0",
        allow_cidrs=(ia.IPv4Network(f"{ALLOWED_HOST}/32"),),
    )
    lab.serve(lab.internet, ALLOWED_HOST, 80)
    lab.serve(lab.internet, OTHER_HOST, 80)

    assert connect(a.ns, ALLOWED_HOST, 80) == MASQUERADED
    assert connect(a.ns, OTHER_HOST, 80) is None
    assert [r[:3] for r in ruleset.read_refused(lab.product, "a")] == [(OTHER_HOST, "tcp", 80)]


def test_internet_reaches_any_outside_address_behind_the_uplink(lab: Lab) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=True)
    a = lab.guest(net, 10)
    lab.rules(a, "a", egress="internet", uplink="up0")
    lab.serve(lab.internet, OTHER_HOST, 80)

    assert connect(a.ns, OTHER_HOST, 80) == MASQUERADED
    assert ruleset.read_refused(lab.product, "a") == []


def test_an_allowed_domain_becomes_reachable_once_resolved(
    lab: Lab, internet_dns: ia.IPv4Address
) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=True)
    a = lab.guest(net, 10)
    lab.rules(a, "a", egress="allow-list", uplink="up0", dns_port=5301)
    dns.start(
        lab.product,
        dns.Resolver("a", net.gateway, 5301, "allow-list", (internet_dns,), (APP_DOMAIN,)),
        lab.run_dir,
    )
    lab.serve(lab.internet, APP_ADDRESS, 80)
    lab.serve(lab.internet, OTHER_HOST, 80)

    assert connect(a.ns, APP_ADDRESS, 80) is None  # not resolved yet
    # A name that is not allowed is refused by the resolver itself (it never leaves), even one
    # the upstream server knows.
    assert resolve(a.ns, net.gateway, "other.example.test") == (3, [])
    assert resolve(a.ns, net.gateway, APP_DOMAIN) == (0, [str(APP_ADDRESS)])
    assert connect(a.ns, APP_ADDRESS, 80) == MASQUERADED
    assert connect(a.ns, OTHER_HOST, 80) is None

    assert [r[:3] for r in ruleset.read_refused(lab.product, "a")] == [
        (APP_ADDRESS, "tcp", 80),
        (OTHER_HOST, "tcp", 80),
    ]
    lookups, offset = dns.read_queries(lab.run_dir, "a")
    assert [(q.name, q.qtype, q.verdict) for q in lookups] == [
        ("other.example.test", "A", "refused"),
        (APP_DOMAIN, "A", "allowed"),
    ]
    assert {q.client for q in lookups} == {a.address}
    assert dns.read_queries(lab.run_dir, "a", offset) == ([], offset)


def test_a_resolved_name_does_not_open_the_address_to_another_vm(
    lab: Lab, internet_dns: ia.IPv4Address
) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=True)
    a, b = lab.guest(net, 10), lab.guest(net, 11)
    lab.rules(a, "a", egress="allow-list", uplink="up0", dns_port=5301)
    lab.rules(b, "b", egress="allow-list", uplink="up0", dns_port=5302)
    for key, port, domains in (("a", 5301, (APP_DOMAIN,)), ("b", 5302, ())):
        dns.start(
            lab.product,
            dns.Resolver(key, net.gateway, port, "allow-list", (internet_dns,), domains),
            lab.run_dir,
        )
    lab.serve(lab.internet, APP_ADDRESS, 80)

    assert resolve(a.ns, net.gateway, APP_DOMAIN) == (0, [str(APP_ADDRESS)])
    assert resolve(b.ns, net.gateway, APP_DOMAIN) == (3, [])
    # b cannot use a's resolver either (its port on the gateway is a's).
    try:
        resolve(b.ns, net.gateway, APP_DOMAIN, port=5301)
        reached = True
    except OSError:
        reached = False
    assert reached is False
    assert connect(a.ns, APP_ADDRESS, 80) == MASQUERADED
    assert connect(b.ns, APP_ADDRESS, 80) is None


def test_replacing_a_vms_rules_keeps_what_its_resolver_answered(
    lab: Lab, internet_dns: ia.IPv4Address
) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=True)
    a = lab.guest(net, 10)
    lab.rules(a, "a", egress="allow-list", uplink="up0", dns_port=5301)
    dns.start(
        lab.product,
        dns.Resolver("a", net.gateway, 5301, "allow-list", (internet_dns,), (APP_DOMAIN,)),
        lab.run_dir,
    )
    lab.serve(lab.internet, APP_ADDRESS, 80)
    resolve(a.ns, net.gateway, APP_DOMAIN)

    lab.rules(
        a,
        "a",
        egress="allow-list",
        uplink="up0",
        dns_port=5301,
        forwards=(ruleset.Forward("tcp", 10080, 8000),),
    )

    assert connect(a.ns, APP_ADDRESS, 80) == MASQUERADED


def test_internet_resolver_forwards_every_name(lab: Lab, internet_dns: ia.IPv4Address) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=True)
    a = lab.guest(net, 10)
    lab.rules(a, "a", egress="internet", uplink="up0", dns_port=5301)
    dns.start(
        lab.product, dns.Resolver("a", net.gateway, 5301, "internet", (internet_dns,)), lab.run_dir
    )

    assert resolve(a.ns, net.gateway, "other.example.test") == (0, ["203.0.113.20"])
    lookups, _ = dns.read_queries(lab.run_dir, "a")
    assert [(q.name, q.verdict) for q in lookups] == [("other.example.test", "allowed")]


def test_blocked_addresses_stay_refused_whatever_the_policy(lab: Lab) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=True)
    a = lab.guest(net, 10)
    fabric = ruleset.Fabric.for_link(
        lab.link, [net.ifname], blocked=[ia.IPv4Network(f"{OTHER_HOST}/32")]
    )
    ruleset.apply_base(lab.product, fabric)
    lab.rules(a, "a", egress="internet", uplink="up0")
    lab.serve(lab.internet, ALLOWED_HOST, 80)
    lab.serve(lab.internet, OTHER_HOST, 80)

    assert connect(a.ns, ALLOWED_HOST, 80) == MASQUERADED
    assert connect(a.ns, OTHER_HOST, 80) is None
    assert [r[:3] for r in ruleset.read_refused(lab.product, "a")] == [(OTHER_HOST, "tcp", 80)]
