"""Port forwards from the host side, and a VM's rules coming and going with it."""

from __future__ import annotations

import ipaddress as ia
import socket
import subprocess
import sys
import time

import pytest

from vms.network import bridge, dns, netns, ruleset
from vms.network.names import NetworkError

from .conftest import ALLOWED_HOST, Lab, connect, in_ns


def test_a_forward_reaches_a_guest_service_from_the_host_and_stops_when_removed(lab: Lab) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=True)
    a = lab.guest(net, 10)
    lab.rules(a, "a", forwards=(ruleset.Forward("tcp", 10080, 8000),))
    lab.serve(a.ns, a.address, 8000)

    assert connect(lab.host, lab.link.ns_address, 10080) == f"ok {lab.link.host_address}"
    assert connect(lab.host, lab.link.ns_address, 10081) is None

    lab.rules(a, "a")  # the same VM without the forward

    assert connect(lab.host, lab.link.ns_address, 10080) is None
    assert "10080" not in lab.ruleset_text()


def test_a_host_port_is_never_forwarded_to_two_vms(lab: Lab) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=True)
    a, b = lab.guest(net, 10), lab.guest(net, 11)
    lab.rules(a, "a", forwards=(ruleset.Forward("tcp", 10080, 8000),))
    before = lab.ruleset_text()

    with pytest.raises(NetworkError):
        lab.rules(b, "b", forwards=(ruleset.Forward("tcp", 10080, 8000),))

    # The failed transaction left nothing of b behind.
    assert lab.ruleset_text() == before


def test_an_address_is_never_given_rules_for_two_vms(lab: Lab) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=True)
    a = lab.guest(net, 10)
    lab.rules(a, "a")

    with pytest.raises(NetworkError):
        lab.rules(a, "other")


def test_removing_a_vm_removes_every_rule_of_it(lab: Lab) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=True)
    a, b = lab.guest(net, 10), lab.guest(net, 11)
    lab.rules(
        a,
        "a",
        egress="allow-list",
        uplink="up0",
        dns_port=5301,
        allow_cidrs=(ia.IPv4Network("203.0.113.0/28"),),
        forwards=(ruleset.Forward("tcp", 10080, 8000), ruleset.Forward("udp", 10053, 53)),
    )
    lab.rules(b, "b", egress="internet", uplink="up0")
    lab.serve(lab.internet, ALLOWED_HOST, 80)
    connect(a.ns, "203.0.113.20", 80)  # something in a's refused set
    assert ruleset.vm_keys(lab.product) == {"a", "b"}

    ruleset.remove_vm(lab.product, "a")

    text = lab.ruleset_text()
    assert "vm_a_" not in text
    assert str(a.address) not in text
    assert a.port not in text
    assert "10080" not in text and "10053" not in text
    assert ruleset.vm_keys(lab.product) == {"b"}
    assert connect(a.ns, ALLOWED_HOST, 80) is None  # its address has no chain: dropped
    assert connect(b.ns, ALLOWED_HOST, 80) is not None
    ruleset.remove_vm(lab.product, "a")  # a second removal is a no-op


def test_removing_the_base_leaves_an_empty_ruleset(lab: Lab) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=True)
    lab.rules(lab.guest(net, 10), "a")

    ruleset.remove_base(lab.product)

    assert lab.ruleset_text().strip() == ""


def test_reapplying_the_base_keeps_the_vms(lab: Lab) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=False)
    a = lab.guest(net, 10)
    lab.rules(a, "a", egress="internet", uplink="up0")
    lab.serve(lab.internet, ALLOWED_HOST, 80)

    ruleset.apply_base(lab.product, lab.fabric)
    ruleset.apply_base(lab.product, lab.fabric)

    assert ruleset.vm_keys(lab.product) == {"a"}
    assert lab.ruleset_text().count("ip saddr vmap @fwd_from") == 1
    assert connect(a.ns, ALLOWED_HOST, 80) is not None


def test_a_resolver_stops_and_leaves_no_process(lab: Lab) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=True)
    resolver = dns.Resolver("a", net.gateway, 5301, "internet", (ia.IPv4Address("198.51.100.53"),))
    pid = dns.start(lab.product, resolver, lab.run_dir)
    assert dns.running(lab.run_dir, "a") == pid
    assert dns.start(lab.product, resolver, lab.run_dir) != pid  # a restart, not a second one

    dns.stop(lab.run_dir, "a")

    assert dns.running(lab.run_dir, "a") is None
    assert not list(lab.run_dir.glob("dns-a.conf"))


def test_teardown_removes_the_namespace_and_its_link_to_the_host(lab: Lab) -> None:
    lab.network("br1", "10.30.0.0/24", isolated=True)
    netns.teardown(lab.product, lab.link, host_ns=lab.host)

    assert not netns.exists(lab.product)
    assert "sbx0" not in netns.run(lab.host, ["/usr/sbin/ip", "-o", "link"]).stdout.decode()
    assert netns.run(lab.host, ["/usr/sbin/ip", "route"]).stdout.decode() == ""


HOLD = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(4)
print("ready", flush=True)
conns = []
while True:
    c, _ = s.accept(); conns.append(c)
"""


def test_removing_a_vm_forgets_its_tracked_connections(lab: Lab) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=True)
    a = lab.guest(net, 10)
    lab.rules(a, "a", egress="internet", uplink="up0")
    proc = subprocess.Popen(  # noqa: S603 - fixed argv
        [
            "/usr/sbin/ip",
            "netns",
            "exec",
            lab.internet,
            sys.executable,
            "-c",
            HOLD,
            str(ALLOWED_HOST),
            "80",
        ],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    lab.processes.append(proc)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"

    def open_and_keep() -> socket.socket:
        return socket.create_connection((str(ALLOWED_HOST), 80), timeout=2)

    held = in_ns(a.ns, open_and_keep)
    try:
        assert ruleset.connections(lab.product, a.address) == 1

        ruleset.remove_vm(lab.product, "a")

        assert ruleset.connections(lab.product, a.address) == 0
    finally:
        held.close()


def test_a_stricter_policy_can_cut_established_connections(lab: Lab) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=True)
    a = lab.guest(net, 10)
    lab.rules(a, "a", egress="internet", uplink="up0")
    proc = subprocess.Popen(  # noqa: S603 - fixed argv
        [
            "/usr/sbin/ip",
            "netns",
            "exec",
            lab.internet,
            sys.executable,
            "-c",
            HOLD,
            str(ALLOWED_HOST),
            "80",
        ],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    lab.processes.append(proc)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    held = in_ns(a.ns, lambda: socket.create_connection((str(ALLOWED_HOST), 80), timeout=2))
    try:
        vm = ruleset.VmRules("a", net, a.address, a.port, a.mac, egress="none")
        ruleset.apply_vm(lab.product, lab.fabric, vm)
        assert ruleset.connections(lab.product, a.address) == 1  # kept by default

        ruleset.apply_vm(lab.product, lab.fabric, vm, forget_established=True)

        assert ruleset.connections(lab.product, a.address) == 0
        # The guest's next packet on that connection meets the new policy: refused, counted.
        held.sendall(b"x")
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not ruleset.read_refused(lab.product, "a"):
            time.sleep(0.05)
        assert [r[:3] for r in ruleset.read_refused(lab.product, "a")] == [
            (ALLOWED_HOST, "tcp", 80)
        ]
    finally:
        held.close()


def test_host_routes_follow_the_networks(lab: Lab) -> None:
    one = lab.network("br1", "10.30.0.0/24", isolated=True)
    lab.network("br2", "10.31.0.0/24", isolated=True)

    netns.set_host_routes(lab.product, lab.link, [one.subnet], host_ns=lab.host)
    netns.connect_host(lab.product, lab.link, [one.subnet], host_ns=lab.host)  # idempotent

    routes = netns.run(lab.host, ["/usr/sbin/ip", "route"]).stdout.decode().splitlines()
    assert sorted(r.split()[0] for r in routes) == ["10.254.0.0/30", "10.30.0.0/24"]
    addresses = netns.run(lab.host, ["/usr/sbin/ip", "-o", "-4", "addr"]).stdout.decode()
    assert addresses.count("10.254.0.1/30") == 1


def test_a_detached_port_passes_nothing(lab: Lab) -> None:
    net = lab.network("br1", "10.30.0.0/24", isolated=False)
    a, b = lab.guest(net, 10), lab.guest(net, 11)
    lab.rules(a, "a")
    lab.rules(b, "b")
    lab.serve(a.ns, a.address, 8000)
    assert connect(b.ns, a.address, 8000) is not None

    bridge.detach(lab.product, b.port)

    assert connect(b.ns, a.address, 8000, timeout=1.0) is None
    with pytest.raises(NetworkError):
        bridge.port_isolated(lab.product, b.port)
