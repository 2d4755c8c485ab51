"""The agent's ``network`` request: validated off a guest, applied in a namespace the test makes.

Applying it needs root: the agent runs under ``ip netns exec`` in a fresh namespace holding a veth
pair, and configures one end found by its MAC over rtnetlink, as it does in a guest.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute

from vms.agent.client import AgentClient, AgentError
from vms.network import netns as net_ns

from .conftest import CREDENTIAL, RunningAgent, start_agent, stop_agent


def test_network_off_a_guest_only_plans_the_changes(client: AgentClient) -> None:
    result = client.network(
        match_mac="52:54:00:12:34:56",
        mac="52:54:00:12:34:57",
        address="10.250.0.7/24",
        gateway="10.250.0.1",
        dns=["10.250.0.1"],
    )
    assert result["dry_run"] is True and result["applied"] == []
    assert result["planned"] == [
        "ip link set dev <52:54:00:12:34:56> address 52:54:00:12:34:57",
        "ip link set dev <52:54:00:12:34:56> up",
        "ip addr replace 10.250.0.7/24 dev <52:54:00:12:34:56>",
        "ip route replace default via 10.250.0.1 dev <52:54:00:12:34:56>",
        "resolv.conf nameserver 10.250.0.1",
    ]


@pytest.mark.parametrize(
    "fields",
    [
        {"interface": "eth0", "mac": "01:00:5e:00:00:01"},  # multicast
        {"match_mac": "52:54:00"},
        {"interface": "bad name"},
        {"interface": "eth0", "address": "10.0.0.300/24"},
        {"interface": "eth0", "address": "10.0.0.3/24", "gateway": "fd00::1"},
        {"interface": "eth0", "dns": ["resolver.example"]},
        {"interface": "eth0", "up": "yes"},
        {"interface": "eth0", "colour": "blue"},
        {},
    ],
)
def test_network_rejects_invalid_requests(client: AgentClient, fields: dict) -> None:
    with pytest.raises(AgentError) as info:
        client._request({"op": "network", **fields})
    assert info.value.code == "bad_request"


def test_client_refuses_network_without_a_selector(client: AgentClient) -> None:
    with pytest.raises(ValueError, match="match_mac or interface"):
        client.network(address="10.0.0.2/24")


@pytest.fixture
def ns_agent(short_dir: str) -> Iterator[tuple[str, RunningAgent]]:
    """The agent applying changes inside a fresh namespace with veth pair d0 (52:54:00:00:77:01)
    and d1. (No ``dns`` here: it would write the host's resolv.conf; the guest tests cover it.)"""
    name = f"agnet-{uuid.uuid4().hex[:8]}"
    net_ns.create(name)
    try:

        def setup() -> None:
            with IPRoute() as ipr:
                ipr.link("add", ifname="d0", kind="veth", peer="d1", address="52:54:00:00:77:01")
                ipr.link("set", index=ipr.link_lookup(ifname="d1")[0], state="up")

        net_ns.call_in(name, setup)
        running = start_agent(short_dir, "--apply-configure", prefix=["ip", "netns", "exec", name])
        try:
            yield name, running
        finally:
            stop_agent(running)
    finally:
        net_ns.remove(name)


def _state(ns: str) -> dict[str, object]:
    def read() -> dict[str, object]:
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname="d0")[0]
            (link,) = ipr.get_links(index)
            addrs = sorted(
                f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                for a in ipr.get_addr(index=index, family=2)
            )
            gws = [r.get_attr("RTA_GATEWAY") for r in ipr.get_default_routes(family=2)]
            return {
                "mac": link.get_attr("IFLA_ADDRESS"),
                "up": bool(link["flags"] & 1),
                "addrs": addrs,
                "gateways": gws,
            }

    return net_ns.call_in(ns, read)


def test_network_finds_the_interface_by_mac_and_configures_it(
    ns_agent: tuple[str, RunningAgent],
) -> None:
    ns, running = ns_agent
    with AgentClient(running.connect, timeout=20, credential=CREDENTIAL) as client:
        client.hello(timeout=10)
        done = client.network(
            match_mac="52:54:00:00:77:01",
            mac="52:54:00:00:77:02",
            address="10.77.0.5/24",
            gateway="10.77.0.1",
        )
        assert done["dry_run"] is False
        assert done["interface"] == "d0" and done["mac"] == "52:54:00:00:77:02"
        assert _state(ns) == {
            "mac": "52:54:00:00:77:02",
            "up": True,
            "addrs": ["10.77.0.5/24"],
            "gateways": ["10.77.0.1"],
        }
        # Again, found by its new MAC: the address is replaced, not added.
        client.network(match_mac="52:54:00:00:77:02", address="10.88.0.9/16", gateway="10.88.0.1")
        assert _state(ns)["addrs"] == ["10.88.0.9/16"]
        assert _state(ns)["gateways"] == ["10.88.0.1"]
        client.network(interface="d0", up=False)
        assert _state(ns)["up"] is False
        # The old MAC finds nothing now.
        with pytest.raises(AgentError) as info:
            client.network(match_mac="52:54:00:00:77:01", up=True)
        assert info.value.code == "not_found"


def test_network_failure_is_reported_not_fatal(ns_agent: tuple[str, RunningAgent]) -> None:
    _ns, running = ns_agent
    with AgentClient(running.connect, timeout=20, credential=CREDENTIAL) as client:
        client.hello(timeout=10)
        # A gateway outside every connected network: the kernel refuses the route.
        with pytest.raises(AgentError) as info:
            client.network(interface="d0", address="10.77.0.5/24", gateway="10.99.0.1")
        assert info.value.code == "configure_failed"
        assert client.ping() < 5
    assert running.alive()


def test_configure_carries_one_nic_found_by_mac(client: AgentClient) -> None:
    result = client.configure(
        time=1_700_000_000.5, match_mac="02:00:00:00:00:01", mac="52:54:00:12:34:58"
    )
    assert result["planned"][-2:] == [
        "ip link set dev <02:00:00:00:00:01> address 52:54:00:12:34:58",
        "ip link set dev <02:00:00:00:00:01> up",
    ]
