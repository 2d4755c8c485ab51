"""The reconciler removes TAPs, rules and resolvers of VMs that are not live, in a product
namespace of the test's own (no guest needed: the TAPs and rules are made directly)."""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from vms import commands, netplumb, reconcile, tasks, vmnet
from vms.models import Network, VirtualMachine
from vms.network import bridge as br
from vms.network import netns, ruleset, tap

pytestmark = pytest.mark.django_db


@pytest.fixture
def host(settings: Any, vm_dirs: dict[str, Path]) -> Iterator[netplumb.HostNet]:
    if os.geteuid() != 0:
        pytest.fail("the networking tests need root (network namespaces, nftables)")
    tag = secrets.token_hex(3)
    name, host_ns = f"nbo{tag}", f"nbq{tag}"
    link = f"10.254.{secrets.randbelow(256)}.{4 * secrets.randbelow(64)}/30"
    run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    settings.SANDBOX_NETWORKING = "on"
    settings.SANDBOX_NETNS = name
    settings.SANDBOX_NET_HOST_LINK = link
    settings.SANDBOX_NET_HOST_NS = host_ns
    settings.SANDBOX_NET_RUN_DIR = str(run_dir)
    netns.create(host_ns)
    hn = netplumb.host_config()
    assert hn is not None and hn.netns == name
    try:
        netplumb.setup_host(hn, [])
        yield hn
    finally:
        netplumb.teardown_host(hn)
        netns.remove(host_ns)
        shutil.rmtree(run_dir, ignore_errors=True)
    assert not netns.exists(name) and not netns.exists(host_ns)


def _plug(
    hn: netplumb.HostNet, bridge: br.Bridge, key: str, index: int, tap_name: str = ""
) -> netplumb.NicPlan:
    nic = netplumb.NicPlan(
        key=key,
        tap=tap_name or f"t{key[:12]}",
        mac=f"52:54:00:7c:00:{index:02x}",
        address=bridge.subnet.network_address + index,
        bridge=bridge,
    )
    spec = netplumb.plug(hn, [bridge], nic)
    assert spec.fd is not None
    os.close(spec.fd)
    return nic


def test_the_reconciler_removes_the_nics_of_vms_that_are_gone_and_keeps_the_others(
    host: netplumb.HostNet, caller_for, make_running_vm
) -> None:
    net = ipaddress.IPv4Network("10.219.13.0/24")
    bridge = br.Bridge("nbo0", net, net.network_address + 1)
    operator = caller_for("operator")
    # A VM whose row is live (not started yet: say its start was interrupted after the plug).
    kept_vm = VirtualMachine.objects.get(
        pk=commands.create(operator, name="kept", template="linux-small", start_now=False).vm_id
    )
    assert kept_vm.tap
    kept = _plug(host, bridge, kept_vm.pk.hex, 10, tap_name=kept_vm.tap)
    # A running VM whose VMM is gone: the reconciler records the crash and unplugs its NIC.
    crashed_vm = make_running_vm(operator, name="crashing")
    crashed = _plug(host, bridge, crashed_vm.pk.hex, 11, tap_name=crashed_vm.tap)
    # Leftovers of a VM the database does not know (a destroy interrupted before its unplug).
    gone = _plug(host, bridge, uuid.uuid4().hex, 12)
    (host.run_dir / f"dns-{gone.key}.conf").write_text("port=40012\n")

    counts = reconcile.reconcile()

    assert counts["crashed"] == 1
    assert (counts["net_taps"], counts["net_rules"], counts["net_resolvers"]) == (1, 1, 1)
    assert tap.list_taps(host.netns) == [kept.tap]
    assert ruleset.vm_keys(host.netns) == {kept_vm.pk.hex}
    assert crashed.tap not in tap.list_taps(host.netns)
    assert not (host.run_dir / f"dns-{gone.key}.conf").exists()
    # Once: the next pass finds nothing more.
    again = reconcile.reconcile()
    assert (again["net_taps"], again["net_rules"], again["net_resolvers"]) == (0, 0, 0)


def test_under_the_tests_networking_never_uses_the_machines_own_namespace(settings: Any) -> None:
    settings.SANDBOX_NETWORKING = "on"
    settings.SANDBOX_NET_HOST_NS = ""
    with pytest.raises(ImproperlyConfigured, match="SANDBOX_NET_HOST_NS"):
        netplumb.host_config()


def test_a_changed_isolation_reaches_the_ports_of_vms_already_on_the_network(
    host: netplumb.HostNet, caller_for, django_capture_on_commit_callbacks
) -> None:
    admin = caller_for("admin")
    network = commands.create_network(
        admin,
        name="shared",
        subnet="10.219.14.0/24",
        bridge="nbo1",
        isolated=True,
        port_min=31000,
        port_max=31010,
    )
    bridge = vmnet.bridge_of(network)
    netplumb.ensure_network(host, vmnet.bridges(), bridge)
    nics = [_plug(host, bridge, uuid.uuid4().hex, i) for i in (10, 11)]
    assert all(br.port_isolated(host.netns, nic.tap) for nic in nics)

    with django_capture_on_commit_callbacks() as enqueued:
        commands.update_network(admin, network, isolated=False)
    assert len(enqueued) == 1  # the task below, enqueued on commit
    assert tasks.apply_network_settings(str(network.pk)) == "applied"
    assert not any(br.port_isolated(host.netns, nic.tap) for nic in nics)

    with django_capture_on_commit_callbacks() as enqueued:
        commands.update_network(admin, Network.objects.get(pk=network.pk), isolated=True)
    assert len(enqueued) == 1
    assert tasks.apply_network_settings(str(network.pk)) == "applied"
    assert all(br.port_isolated(host.netns, nic.tap) for nic in nics)

    # Other changes leave the bridge alone; a network not in place waits for its first VM.
    with django_capture_on_commit_callbacks() as enqueued:
        commands.update_network(admin, Network.objects.get(pk=network.pk), name="renamed")
    assert enqueued == []
    later = commands.create_network(
        admin, name="later", subnet="10.219.15.0/24", bridge="nbo2", port_min=31011, port_max=31020
    )
    assert tasks.apply_network_settings(str(later.pk)) == "not in place"
