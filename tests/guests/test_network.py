"""Real QEMU guests with a NIC: a TAP in a network namespace the test makes, passed by descriptor.

Each test builds its own namespace (a bridge with the gateway address and the VMs' TAPs) and
removes it; traffic goes only between the guests and that namespace. The guests get their MAC,
address, gateway and resolvers from the agent (``readiness.configure_guest``), also when they are
restored from a template that was saved with MACs of its own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vms.agent import readiness
from vms.hypervisors.base import NetSpec, RuntimeDir, TemplateHooks, VMSpec
from vms.hypervisors.qemu import QemuHypervisor
from vms.hypervisors.templates import TemplateCache, template_mac
from vms.images import make_data_disk
from vms.network import bridge, netns, tap

from .conftest import HELLO_TIMEOUT, connect_agent

pytestmark = pytest.mark.guest

SUBNET = "10.213.7"
GATEWAY = f"{SUBNET}.1"
BRIDGE = bridge.Bridge(
    "br0", ipaddress.IPv4Network(f"{SUBNET}.0/24"), ipaddress.IPv4Address(GATEWAY)
)


@dataclass
class Netns:
    name: str

    def add_tap(self, ifname: str) -> None:
        tap.create(self.name, ifname)
        bridge.attach(self.name, ifname, BRIDGE)

    def ping(self, address: str) -> bool:
        done = subprocess.run(
            ["ip", "netns", "exec", self.name, "busybox", "ping", "-c", "1", "-W", "5", address],
            capture_output=True,
            timeout=30,
            check=False,
        )
        return done.returncode == 0

    def tcp_read(self, address: str, port: int) -> bytes:
        def read() -> bytes:
            with socket.create_connection((address, port), timeout=20) as sock:
                return sock.recv(100)

        return netns.call_in(self.name, read)


@pytest.fixture
def testnet() -> Iterator[Netns]:
    """A namespace like the product's (``netns.create``) with the network's bridge holding the
    gateway address (ports isolated, as by default); removed with everything in it."""
    name = f"guestnet-{uuid.uuid4().hex[:8]}"
    netns.create(name)
    try:
        bridge.ensure_bridge(name, BRIDGE)
        yield Netns(name)
    finally:
        netns.remove(name)
    assert not netns.exists(name)


@pytest.fixture
def nic_templates(hv: QemuHypervisor, runtime_root: Path, tmp_path: Path) -> TemplateCache:
    """A template cache of this test's own: the NIC template is built on this test's TAP."""
    hooks = TemplateHooks(readiness.wait_ready, readiness.reset_identity, make_data_disk)
    return hv.template_cache(hooks, cache_dir=tmp_path / "tpl", scratch_root=runtime_root)


@pytest.fixture
def nic_spec(make_spec: Callable[..., VMSpec], testnet: Netns) -> Iterator[Callable[..., VMSpec]]:
    """A spec with one NIC on a new TAP of the test namespace, its descriptor open."""
    fds: list[int] = []

    def make(vm_id: str, host: int, mac: str) -> VMSpec:
        ifname = f"t{vm_id[:10]}"
        testnet.add_tap(ifname)
        fd = tap.open_fd(testnet.name, ifname)
        fds.append(fd)
        net = NetSpec(
            ifname,
            mac,
            fd=fd,
            netns=testnet.name,
            address=f"{SUBNET}.{host}/24",
            gateway=GATEWAY,
            dns=(GATEWAY,),
        )
        return make_spec(vm_id).replace(nets=(net,))

    yield make
    for fd in fds:
        os.close(fd)


def serve_once(guest_client, port: int, text: str) -> threading.Thread:  # noqa: ANN001
    """A TCP server in the guest (started by exec) that sends ``text`` to its first client."""
    script = (
        "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
        f"s.bind(('0.0.0.0',{port}));s.listen(1);open('/run/listening','w').close();"
        f"c,_=s.accept();c.sendall({text.encode()!r});c.close()"
    )
    worker = threading.Thread(
        target=guest_client.exec, args=(["python3", "-c", script],), kwargs={"timeout": 60}
    )
    worker.start()
    for _ in range(200):
        if guest_client.exec(["test", "-e", "/run/listening"]).exit_code == 0:
            return worker
    raise AssertionError("the guest's server did not start")


def guest_answers(testnet: Netns, client, address: str, text: str) -> None:  # noqa: ANN001
    assert testnet.ping(address), f"no ping answer from {address}"
    worker = serve_once(client, 8080, text)
    try:
        assert testnet.tcp_read(address, 8080) == text.encode()
    finally:
        worker.join(60)
    client.exec(["rm", "-f", "/run/listening"])


def test_cold_booted_guest_is_configured_by_the_agent_and_answers_at_its_address(
    hv: QemuHypervisor,
    nic_spec,
    runtime_root: Path,
    testnet: Netns,  # noqa: ANN001
) -> None:
    spec = nic_spec("netcold", 10, "52:54:00:21:00:10")
    runtime = RuntimeDir(runtime_root / "netcold")
    hv.start(spec, runtime)
    try:
        client = connect_agent(hv, runtime, HELLO_TIMEOUT, None)
        try:
            readiness.configure_guest(client, hv, runtime, spec)
            assert hv.nic_macs(runtime) == {"net0": "52:54:00:21:00:10"}
            addr = client.exec(["ip", "addr", "show", "dev", "eth0"]).stdout
            assert f"inet {SUBNET}.10/24".encode() in addr
            route = client.exec(["ip", "route"]).stdout
            assert f"default via {GATEWAY}".encode() in route
            resolv = client.read_file("/etc/resolv.conf")
            assert resolv == f"nameserver {GATEWAY}\n".encode()
            guest_answers(testnet, client, f"{SUBNET}.10", "cold")
            counters = hv.counters(runtime)["net0"]
            assert counters["rx_packets"] > 0 and counters["tx_packets"] > 0
        finally:
            client.close()
    finally:
        hv.destroy(runtime)


def test_guests_restored_from_a_nic_template_get_their_own_mac_and_address(
    hv: QemuHypervisor,
    nic_spec,  # noqa: ANN001
    nic_templates: TemplateCache,
    runtime_root: Path,
    testnet: Netns,
) -> None:
    specs = [
        nic_spec("netrest1", 21, "52:54:00:21:00:21"),
        nic_spec("netrest2", 22, "52:54:00:21:00:22"),
    ]
    assert nic_templates.usable_for(specs[0]) is None
    key = nic_templates.key(specs[0])
    assert nic_templates.key(specs[1]) == key  # TAPs, MACs and addresses are not the shape
    runtimes = [RuntimeDir(runtime_root / s.vm_id) for s in specs]
    try:
        for spec, runtime in zip(specs, runtimes, strict=True):
            result = nic_templates.start(spec, runtime, fallback=False)
            assert result.restored, result.reason
            assert hv.nic_macs(runtime) == {"net0": spec.nets[0].mac}
        saved = nic_templates.lookup(specs[0])
        assert saved is not None
        manifest = json.loads((saved.directory / "snapshot.json").read_text())
        assert manifest["spec"]["nets"][0]["mac"] == template_mac(key, 0)
        for spec, runtime in zip(specs, runtimes, strict=True):
            client = connect_agent(hv, runtime, 30, result.guest_secret)
            try:
                mac = client.read_file("/sys/class/net/eth0/address").decode().strip()
                assert mac == spec.nets[0].mac
                host = spec.nets[0].address.split("/")[0]
                guest_answers(testnet, client, host, spec.vm_id)
            finally:
                client.close()
        # The template's MAC never reached the network.
        fdb = subprocess.run(
            ["bridge", "-n", testnet.name, "fdb", "show", "br", "br0"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        assert template_mac(key, 0) not in fdb
        assert all(s.nets[0].mac in fdb for s in specs)
    finally:
        for runtime in runtimes:
            with contextlib.suppress(Exception):
                hv.destroy(runtime)
