"""nftables through libnftables in this process (``vms.network.nftlib``), in namespaces the test
creates: the same transaction and listing as the ``nft`` program, confined to the namespace."""

from __future__ import annotations

import ipaddress as ia
import json
import os
import uuid
from collections.abc import Iterator

import pytest
from pyroute2 import netns

from vms.network import netns as net_ns
from vms.network import nftlib, ruleset
from vms.network.bridge import Bridge
from vms.network.names import NetworkError
from vms.network.netns import HostLink

NET = Bridge("br1", ia.IPv4Network("10.30.0.0/24"), ia.IPv4Address("10.30.0.1"))
FABRIC = ruleset.Fabric.for_link(
    HostLink("sbx0", "host0", ia.IPv4Network("10.254.0.0/30")), ["br1"]
)
VM = ruleset.VmRules(
    key="abc",
    bridge=NET,
    address=ia.IPv4Address("10.30.0.10"),
    port_ifname="tap0",
    mac="02:00:00:00:00:0a",
    forwards=(ruleset.Forward("tcp", 10080, 80),),
)


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0:
        pytest.fail("nftables tests need root (network namespaces)")
    names = (f"nfta-{uuid.uuid4().hex[:8]}", f"nftb-{uuid.uuid4().hex[:8]}")
    for name in names:
        netns.create(name)
    yield names
    for name in names:
        netns.remove(name)


def _cli_json(ns: str) -> list[dict[str, object]]:
    out = net_ns.run(ns, [ruleset.NFT, "-j", "list", "ruleset"]).stdout
    return [item for item in json.loads(out)["nftables"] if "metainfo" not in item]


def test_the_library_loads() -> None:
    assert nftlib.available()


def test_a_load_is_what_the_nft_program_sees_and_stays_in_its_namespace(
    pair: tuple[str, str],
) -> None:
    a, b = pair
    ruleset.apply_base(a, FABRIC)
    ruleset.apply_vm(a, FABRIC, VM)
    listed = nftlib.run(a, "list ruleset", json=True)
    assert listed.returncode == 0, listed.error
    items = [i for i in json.loads(listed.output)["nftables"] if "metainfo" not in i]
    assert items == _cli_json(a)
    assert any(i.get("chain", {}).get("name") == "vm_abc_fwd" for i in items)
    assert ruleset.vm_keys(a) == {"abc"}
    assert _cli_json(b) == []  # the other namespace got nothing
    ruleset.remove_vm(a, "abc")
    assert ruleset.vm_keys(a) == set()


def test_a_failing_transaction_changes_nothing_and_says_why(pair: tuple[str, str]) -> None:
    a, _ = pair
    ruleset.apply_base(a, FABRIC)
    before = _cli_json(a)
    text = ruleset.render_vm(FABRIC, VM) + "add rule inet sandbox no_such_chain accept\n"
    with pytest.raises(NetworkError, match="no_such_chain|No such file"):
        ruleset.load(a, text)
    assert _cli_json(a) == before


def test_check_only_applies_nothing(pair: tuple[str, str]) -> None:
    a, _ = pair
    ruleset.load(a, ruleset.render_base(FABRIC), check_only=True)
    assert _cli_json(a) == []
    with pytest.raises(NetworkError):
        ruleset.load(
            a, "add table inet sandbox\nadd chain inet sandbox x { bogus }\n", check_only=True
        )


def test_refusals(pair: tuple[str, str]) -> None:
    with pytest.raises(NetworkError, match="does not exist"):
        nftlib.run(f"gone-{uuid.uuid4().hex[:8]}", "list ruleset")
    with pytest.raises(NetworkError, match="NUL"):
        nftlib.run(pair[0], "list ruleset\0flush ruleset")
