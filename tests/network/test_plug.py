"""Plugging a VM's NIC in two steps (``netplumb.plug_begin``): the TAP and its descriptor at
once, its bridge port and rules on a thread, in a product namespace of the test's own."""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from vms import netplumb
from vms.network import bridge as br
from vms.network import netns, ruleset, tap
from vms.network.names import NetworkError

SUBNET = ipaddress.IPv4Network("10.219.31.0/24")
BRIDGE = br.Bridge("plbr0", SUBNET, SUBNET.network_address + 1)


@pytest.fixture
def host() -> Iterator[netplumb.HostNet]:
    if os.geteuid() != 0:
        pytest.fail("the network plumbing tests need root (network namespaces, nftables)")
    tag = secrets.token_hex(3)
    run_dir = Path(tempfile.mkdtemp(prefix=f"pl{tag}-"))
    link = f"10.254.{secrets.randbelow(256)}.{4 * secrets.randbelow(64)}/30"
    hn = netplumb.HostNet.make(f"plp{tag}", link, run_dir, host_ns=f"plh{tag}")
    netns.create(f"plh{tag}")
    try:
        netplumb.setup_host(hn, [BRIDGE])
        yield hn
    finally:
        netplumb.teardown_host(hn)
        netns.remove(f"plh{tag}")
        shutil.rmtree(run_dir, ignore_errors=True)
    assert not netns.exists(hn.netns)


def _nic(index: int) -> netplumb.NicPlan:
    key = secrets.token_hex(16)
    return netplumb.NicPlan(
        key=key,
        tap=f"t{key[:12]}",
        mac=f"52:54:00:7b:00:{index:02x}",
        address=SUBNET.network_address + index,
        bridge=BRIDGE,
    )


def _master(hn: netplumb.HostNet, ifname: str) -> str | None:
    def read() -> str | None:
        with IPRoute() as ipr:
            (link,) = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])
            master = link.get_attr("IFLA_MASTER")
            if master is None:
                return None
            return str(ipr.get_links(master)[0].get_attr("IFLA_IFNAME"))

    return netns.call_in(hn.netns, read)


def test_the_tap_comes_first_and_its_port_and_rules_by_wait(host: netplumb.HostNet) -> None:
    nic = _nic(10)
    plugging = netplumb.plug_begin(host, [BRIDGE], nic)
    try:
        spec = plugging.netspec
        assert spec.fd is not None and spec.tap == nic.tap and spec.mac == nic.mac
        assert spec.address == f"{nic.address}/24" and spec.netns == host.netns
        assert tap.exists(host.netns, nic.tap)
        plugging.wait()
        assert _master(host, nic.tap) == BRIDGE.ifname
        assert ruleset.vm_keys(host.netns) == {nic.key}
        plugging.wait()  # again: nothing more, no error
    finally:
        plugging.join()
        os.close(plugging.netspec.fd)  # type: ignore[arg-type]
    assert netplumb.unplug(host, nic.key, nic.tap) == []
    assert not tap.exists(host.netns, nic.tap) and ruleset.vm_keys(host.netns) == set()


def test_a_failure_on_the_thread_is_raised_by_wait_and_leaves_nothing(
    host: netplumb.HostNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise NetworkError("the rules did not load")

    monkeypatch.setattr(ruleset, "apply_vm", refuse)
    nic = _nic(11)
    plugging = netplumb.plug_begin(host, [BRIDGE], nic)
    try:
        with pytest.raises(NetworkError, match="the rules did not load"):
            plugging.wait()
        with pytest.raises(NetworkError, match="the rules did not load"):
            plugging.wait()  # the same answer to every caller
    finally:
        os.close(plugging.netspec.fd)  # type: ignore[arg-type]
    assert not tap.exists(host.netns, nic.tap)
    assert ruleset.vm_keys(host.netns) == set()
    # The synchronous plug says the same and leaves nothing either.
    other = _nic(12)
    with pytest.raises(NetworkError, match="the rules did not load"):
        netplumb.plug(host, [BRIDGE], other)
    assert tap.list_taps(host.netns) == []


def test_a_leftover_tap_of_the_same_vm_is_replaced(host: netplumb.HostNet) -> None:
    nic = _nic(13)
    tap.create(host.netns, nic.tap)
    spec = netplumb.plug(host, [BRIDGE], nic)
    assert spec.fd is not None
    os.close(spec.fd)
    assert _master(host, nic.tap) == BRIDGE.ifname
    assert tap.list_taps(host.netns) == [nic.tap]
    netplumb.unplug(host, nic.key, nic.tap)


def test_a_bridge_removed_behind_the_workers_back_is_mended_by_the_next_plug(
    host: netplumb.HostNet,
) -> None:
    assert br.present(host.netns, BRIDGE.ifname)
    br.remove_bridge(host.netns, BRIDGE.ifname)
    assert not br.present(host.netns, BRIDGE.ifname)
    assert not br.present(f"gone{secrets.token_hex(3)}", BRIDGE.ifname)
    nic = _nic(14)
    plugging = netplumb.plug_begin(host, [BRIDGE], nic)
    try:
        plugging.wait()
    finally:
        os.close(plugging.netspec.fd)  # type: ignore[arg-type]
    assert br.present(host.netns, BRIDGE.ifname)
    assert _master(host, nic.tap) == BRIDGE.ifname
    netplumb.unplug(host, nic.key, nic.tap)
