"""What reaches nft and dnsmasq as text is built from validated values only."""

from __future__ import annotations

import ipaddress as ia
from pathlib import Path

import pytest

from vms.network import dns, ruleset
from vms.network.bridge import Bridge
from vms.network.names import NetworkError, check_domain, check_ifname, check_key, check_netns
from vms.network.netns import HostLink

NET = Bridge("br1", ia.IPv4Network("10.30.0.0/24"), ia.IPv4Address("10.30.0.1"))
FABRIC = ruleset.Fabric.for_link(
    HostLink("sbx0", "host0", ia.IPv4Network("10.254.0.0/30")), ["br1"]
)


def vm(**kwargs: object) -> ruleset.VmRules:
    base: dict[str, object] = {
        "key": "abc",
        "bridge": NET,
        "address": ia.IPv4Address("10.30.0.10"),
        "port_ifname": "tap0",
        "mac": "02:00:00:00:00:0a",
    }
    base.update(kwargs)
    return ruleset.VmRules(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name", ["", "a" * 16, "1eth", 'br"0', "br 0", "br;0", "br/0", "br\n0", "bré"]
)
def test_interface_names_are_refused_unless_strict(name: str) -> None:
    with pytest.raises(NetworkError):
        check_ifname(name)


@pytest.mark.parametrize("key", ["", "A", "a-b", "a b", "_a", "a" * 41, "vm;flush ruleset"])
def test_keys_are_refused_unless_strict(key: str) -> None:
    with pytest.raises(NetworkError):
        check_key(key)


@pytest.mark.parametrize("name", ["", "../x", "a/b", "-x", "x" * 64, "a b"])
def test_namespace_names_are_refused_unless_strict(name: str) -> None:
    with pytest.raises(NetworkError):
        check_netns(name)


@pytest.mark.parametrize(
    "name",
    ["", "localhost", "*.example.com", "a..b", "-a.com", "a.com/", "a.123", "x\n.com", "é.com"],
)
def test_domains_are_refused_unless_names(name: str) -> None:
    with pytest.raises(NetworkError):
        check_domain(name)


def test_domains_are_normalised() -> None:
    assert check_domain("App.Example.COM.") == "app.example.com"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"address": "10.30.0.10"},  # text, not an address object
        {"address": ia.IPv4Address("10.31.0.10")},  # outside the bridge's subnet
        {"address": ia.IPv4Address("10.30.0.1")},  # the gateway
        {"mac": "02:00:00:00:00"},
        {"egress": "everything"},
        {"egress": "internet"},  # no uplink
        {"egress": "internet", "uplink": "up 0"},
        {"dns_port": 0},
        {"dns_port": True},
        {"allow_cidrs": ("10.0.0.0/8",)},
        {"forwards": (ruleset.Forward("tcp", 10080, 80), ruleset.Forward("tcp", 10080, 81))},
    ],
)
def test_vm_rules_refuse_invalid_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(NetworkError):
        vm(**kwargs)


@pytest.mark.parametrize("kwargs", [{"protocol": "icmp"}, {"host_port": 70000}, {"guest_port": -1}])
def test_forwards_refuse_invalid_values(kwargs: dict[str, object]) -> None:
    values: dict[str, object] = {"protocol": "tcp", "host_port": 10080, "guest_port": 80}
    values.update(kwargs)
    with pytest.raises(NetworkError):
        ruleset.Forward(**values)  # type: ignore[arg-type]


def test_bridges_need_a_private_subnet_and_a_host_gateway() -> None:
    with pytest.raises(NetworkError):
        Bridge("br1", ia.IPv4Network("8.8.8.0/24"), ia.IPv4Address("8.8.8.1"))
    with pytest.raises(NetworkError):
        Bridge("br1", ia.IPv4Network("10.30.0.0/24"), ia.IPv4Address("10.30.0.0"))
    with pytest.raises(NetworkError):
        Bridge("br1", ia.IPv4Network("10.30.0.0/24"), ia.IPv4Address("10.31.0.1"))


def test_every_rule_of_a_vm_is_named_for_it() -> None:
    text = ruleset.render_vm(
        FABRIC,
        vm(
            egress="allow-list",
            uplink="up0",
            dns_port=5301,
            allow_cidrs=(ia.IPv4Network("203.0.113.0/25"), ia.IPv4Network("203.0.113.128/25")),
            forwards=(ruleset.Forward("tcp", 10080, 80),),
        ),
    )
    for line in text.splitlines():
        assert "vm_abc_" in line, line
    # Adjacent CIDRs are merged; the forward and the resolver redirect are there.
    assert "{ 203.0.113.0/24 }" in text
    assert "dnat ip to 10.30.0.10:80" in text
    assert "dnat ip to 10.30.0.1:5301" in text


def test_resolver_config_for_an_allow_list() -> None:
    resolver = dns.Resolver(
        "abc",
        ia.IPv4Address("10.30.0.1"),
        5301,
        "allow-list",
        (ia.IPv4Address("198.51.100.53"),),
        ("B.example.com", "a.example.com", "a.example.com."),
    )
    text = dns.render_config(resolver, Path("/run/x"))

    assert "address=/#/" in text.splitlines()
    assert [line for line in text.splitlines() if line.startswith(("server=", "nftset="))] == [
        "server=/a.example.com/198.51.100.53",
        "nftset=/a.example.com/4#inet#sandbox#vm_abc_dns",
        "server=/b.example.com/198.51.100.53",
        "nftset=/b.example.com/4#inet#sandbox#vm_abc_dns",
    ]
    assert "listen-address=10.30.0.1" in text and "port=5301" in text


def test_resolver_refuses_port_53_and_policy_none() -> None:
    gateway, upstream = ia.IPv4Address("10.30.0.1"), (ia.IPv4Address("198.51.100.53"),)
    with pytest.raises(NetworkError):
        dns.Resolver("abc", gateway, 53, "internet", upstream)
    with pytest.raises(NetworkError):
        dns.Resolver("abc", gateway, 5301, "none", upstream)  # type: ignore[arg-type]
    with pytest.raises(NetworkError):
        dns.Resolver("abc", gateway, 5301, "internet", ())


LOG = """\
Nov 30 01:54:53 dnsmasq[6682]: started, version 2.90 cache disabled
Nov 30 01:54:53 dnsmasq[6682]: 1 10.30.0.10/56923 query[A] other.example.test from 10.30.0.10
Nov 30 01:54:53 dnsmasq[6682]: 1 10.30.0.10/56923 config other.example.test is NXDOMAIN
Nov 30 01:54:53 dnsmasq[6682]: 2 10.30.0.10/35925 query[A] app.example.test from 10.30.0.10
Nov 30 01:54:53 dnsmasq[6682]: 2 10.30.0.10/35925 forwarded app.example.test to 198.51.100.53
Nov 30 01:54:53 dnsmasq[6682]: 2 10.30.0.10/35925 nftset add 4 inet sandbox vm_a_dns 198.51.100.80 app.example.test
Nov 30 01:54:53 dnsmasq[6682]: 2 10.30.0.10/35925 reply app.example.test is 198.51.100.80
Nov 30 01:54:54 dnsmasq[6682]: 3 10.30.0.10/46739 query[AAAA] App.example.test from 10.30.0.10
Nov 30 01:54:54 dnsmasq[6682]: 3 10.30.0.10/46739 forwarded App.example.test to 198.51.100.53
Nov 30 01:54:54 dnsmasq[6682]: 4 10.30.0.10/46740 query[A] half"""


def test_query_log_becomes_lookups_with_verdicts(tmp_path: Path) -> None:
    dns.paths(tmp_path, "a").log.write_text(LOG)

    lookups, offset = dns.read_queries(tmp_path, "a")

    assert [(q.name, q.qtype, str(q.client), q.verdict) for q in lookups] == [
        ("other.example.test", "A", "10.30.0.10", "refused"),
        ("app.example.test", "A", "10.30.0.10", "allowed"),
        ("app.example.test", "AAAA", "10.30.0.10", "allowed"),
    ]
    # The unfinished last line waits for the next read.
    assert offset == LOG.rindex("\n") + 1
    assert dns.read_queries(tmp_path, "a", offset)[0] == []
    assert dns.read_queries(tmp_path, "missing", 10) == ([], 0)


def test_resolver_ports_follow_the_guest_index_in_its_subnet() -> None:
    subnet = ia.IPv4Network("10.30.0.0/24")
    assert dns.resolver_port(subnet, ia.IPv4Address("10.30.0.10")) == 40010
    assert dns.resolver_port(ia.IPv4Network("10.32.0.0/17"), ia.IPv4Address("10.32.99.1")) == (
        40000 + 99 * 256 + 1
    )
    with pytest.raises(NetworkError):
        dns.resolver_port(subnet, ia.IPv4Address("10.31.0.10"))
    with pytest.raises(NetworkError):
        dns.resolver_port(ia.IPv4Network("10.32.0.0/16"), ia.IPv4Address("10.32.255.1"))


def test_a_new_query_log_is_read_from_its_start(tmp_path: Path) -> None:
    log = dns.paths(tmp_path, "a").log
    log.write_text(LOG)
    _, offset = dns.read_queries(tmp_path, "a")
    log.write_text(LOG.splitlines()[1] + "\n")  # rotated: shorter than the offset

    lookups, new_offset = dns.read_queries(tmp_path, "a", offset)

    assert [q.name for q in lookups] == ["other.example.test"]
    assert new_offset == len(LOG.splitlines()[1]) + 1


def test_resolver_keys_are_those_with_a_configuration(tmp_path: Path) -> None:
    (tmp_path / "dns-abc.conf").write_text("")
    (tmp_path / "dns-Bad Key.conf").write_text("")
    (tmp_path / "dns-def.log").write_text("")

    assert dns.resolver_keys(tmp_path) == {"abc"}
