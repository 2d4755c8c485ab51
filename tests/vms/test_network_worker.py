"""Sandbox networking through the real worker, with real QEMU guests.

The worker process is given a product namespace, a host link subnet and a namespace standing in
for the host, all of this test's own (named per run, removed afterwards even on failure): it sets
them up at start, plugs each VM's NIC when the VM starts and unplugs it at destroy. Traffic goes
only between the guests and those namespaces.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from audit.models import Event
from tests.network.internet import (
    APP_DOMAIN,
    INTERNET_DNS,
    OTHER_DOMAIN,
    OTHER_HOST,
    UPLINK,
    internet,
)
from vms import commands, vmnet
from vms.agent.client import AgentClient
from vms.hypervisors.qemu import QemuHypervisor
from vms.models import VirtualMachine
from vms.network import netns, tap
from vms.runtime import runtime_dir

from .conftest import Worker, wait_for

pytestmark = [pytest.mark.guest, pytest.mark.django_db(transaction=True)]


@dataclass
class NetSite:
    netns: str
    host_ns: str
    run_dir: Path
    worker: Worker

    def links(self) -> str:
        return _out(["ip", "-n", self.netns, "-br", "link"])

    def ruleset(self) -> str:
        return _out(["ip", "netns", "exec", self.netns, "nft", "list", "ruleset"])


def _out(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout


@pytest.fixture
def net_site(worker_env: dict[str, str], settings: Any, tmp_path: Path) -> Iterator[NetSite]:
    if os.geteuid() != 0:
        pytest.fail("the networking tests need root (network namespaces, nftables)")
    tag = secrets.token_hex(3)
    name, host_ns = f"nbw{tag}", f"nbx{tag}"
    link = f"10.254.{secrets.randbelow(256)}.{4 * secrets.randbelow(64)}/30"
    run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    net_settings = {
        "SANDBOX_NETWORKING": "on",
        "SANDBOX_NETNS": name,
        "SANDBOX_NET_HOST_LINK": link,
        "SANDBOX_NET_HOST_NS": host_ns,
        "SANDBOX_NET_RUN_DIR": str(run_dir),
        "SANDBOX_NETNS_KEEP": "0",
        # The test's "internet" (tests.network.internet), attached by the tests that need it.
        "SANDBOX_NET_UPLINK": UPLINK,
        "SANDBOX_NET_DNS": str(INTERNET_DNS),
    }
    for key, value in net_settings.items():
        setattr(settings, key, value if key != "SANDBOX_NETNS_KEEP" else False)
    worker_env.update(net_settings)
    netns.create(host_ns)
    w = Worker(worker_env, tmp_path / "worker.log")
    try:
        w.start()
        wait_for(lambda: netns.exists(name), 60, "the worker to set up its namespace")
        yield NetSite(name, host_ns, run_dir, w)
    finally:
        w.stop()
        for pidfile in run_dir.glob("dns-*.pid"):
            with contextlib.suppress(Exception):
                os.kill(int(pidfile.read_text()), 9)
        with contextlib.suppress(Exception):
            netns.teardown(name)
        netns.remove(host_ns)
        shutil.rmtree(run_dir, ignore_errors=True)
    assert not netns.exists(name) and not netns.exists(host_ns)


def _agent(vm: VirtualMachine) -> AgentClient:
    hv, rt = QemuHypervisor(), runtime_dir(vm.pk)
    client = AgentClient(lambda: hv.agent_connect(rt, 2.0), timeout=30.0, name=rt.root.name)
    client.hello(timeout=30)
    return client


def _settled(vm_id: str, *states: str, timeout: float = 240) -> VirtualMachine:
    def check() -> VirtualMachine | None:
        vm = VirtualMachine.objects.get(pk=vm_id)
        return vm if vm.state in states and not vm.pending_request else None

    return wait_for(check, timeout, f"VM {vm_id} to reach {states}", interval=0.3)


def _serve(client: AgentClient, port: int, text: str) -> threading.Thread:
    flag = f"/run/listening-{port}"
    script = (
        "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
        f"s.bind(('0.0.0.0',{port}));s.listen(1);s.settimeout(30);"
        f"open({flag!r},'w').close();c,_=s.accept();c.sendall({text.encode()!r});c.close()"
    )
    worker = threading.Thread(
        target=client.exec, args=(["python3", "-c", script],), kwargs={"timeout": 60}
    )
    worker.start()
    wait_for(lambda: client.exec(["test", "-e", flag]).exit_code == 0, 60, "the guest's server")
    return worker


def _read_from(client: AgentClient, address: str, port: int) -> str | None:
    script = (
        "import socket,sys\n"
        "try:\n"
        f" s=socket.create_connection(({address!r},{port}),timeout=4)\n"
        " sys.stdout.write(s.recv(100).decode())\n"
        "except OSError:\n"
        " sys.exit(7)\n"
    )
    result = client.exec(["python3", "-c", script], timeout=30)
    return result.stdout.decode() if result.exit_code == 0 else None


def test_two_vms_on_a_network_started_by_the_worker_reach_each_other_and_leave_nothing(
    net_site: NetSite, caller_for: Callable[..., Any], vm_dirs: dict[str, Path]
) -> None:
    admin = caller_for("admin")
    bridge = f"nbb{net_site.netns[-6:]}"
    commands.create_network(
        admin,
        name=f"open-{net_site.netns[-6:]}",
        subnet="10.219.11.0/24",
        bridge=bridge,
        isolated=False,
        port_min=30000,
        port_max=30100,
        default_egress="none",
    )
    operator = caller_for("operator")
    ids = [
        commands.create(
            operator, name=f"net-{i}", template="linux-small", network=f"open-{net_site.netns[-6:]}"
        ).vm_id
        for i in range(2)
    ]
    a, b = (_settled(str(i), "running", "failed") for i in ids)
    assert (a.state, b.state) == ("running", "running"), (a.last_error, b.last_error)
    for vm in (a, b):
        started = Event.objects.get(aggregate_id=str(vm.pk), type="vm.started").payload
        assert started["nic"]["address"] == f"{vm.ip}/24"
        assert started["from_template"] is True  # a VM with a NIC starts from a template
        assert vm.tap in net_site.links()

    client_a, client_b = _agent(a), _agent(b)
    try:
        addr = client_a.exec(["ip", "-4", "addr", "show", "dev", "eth0"]).stdout.decode()
        assert f"inet {a.ip}/24" in addr
        server = _serve(client_a, 8080, "hello-from-a")
        try:
            assert _read_from(client_b, str(a.ip), 8080) == "hello-from-a"
        finally:
            server.join(60)
    finally:
        client_a.close()
        client_b.close()

    # Stopped, its NIC goes; started again (its data disk is used now: a cold boot), a new TAP
    # is plugged and the agent gives the guest its address again.
    commands.stop(operator, VirtualMachine.objects.get(pk=a.pk), force=True)
    _settled(str(a.pk), "stopped", timeout=120)
    assert a.tap not in net_site.links()
    assert f"vm_{a.pk.hex}" not in net_site.ruleset()
    commands.start(operator, VirtualMachine.objects.get(pk=a.pk))
    a = _settled(str(a.pk), "running", "failed")
    assert a.state == "running", a.last_error
    restarted = Event.objects.filter(aggregate_id=str(a.pk), type="vm.started").order_by(
        "-position"
    )
    assert restarted[0].payload["from_template"] is False
    client_a, client_b = _agent(a), _agent(b)
    try:
        server = _serve(client_a, 8081, "cold-a")
        try:
            assert _read_from(client_b, str(a.ip), 8081) == "cold-a"
        finally:
            server.join(60)
    finally:
        client_a.close()
        client_b.close()

    a, b = (VirtualMachine.objects.get(pk=vm.pk) for vm in (a, b))
    for vm in (a, b):
        commands.destroy(operator, vm)
    for vm in (a, b):
        _settled(str(vm.pk), "destroyed", timeout=120)
    links, rules = net_site.links(), net_site.ruleset()
    assert tap.list_taps(net_site.netns) == []
    for vm in (a, b):
        assert vm.tap not in links
        assert f"vm_{vm.pk.hex}" not in rules
        assert str(vm.ip) not in rules
    assert ipaddress.IPv4Address(a.ip) != ipaddress.IPv4Address(b.ip)
    assert not list(net_site.run_dir.glob("dns-*.conf"))
    # Events say who did it: the leases were released by the destroys.
    released = Event.objects.filter(type="net.ip_released", aggregate_id__in=[str(i) for i in ids])
    assert released.count() == 2


def _fetch(client: AgentClient, target: str) -> str | None:
    """From the guest: resolve ``target`` and read what its port 80 sends ("nxdomain" when the
    name does not resolve, None when the connection fails)."""
    script = (
        "import socket,sys\n"
        "try:\n"
        f" a=socket.gethostbyname({target!r})\n"
        "except OSError:\n"
        " print('nxdomain'); sys.exit(0)\n"
        "try:\n"
        " s=socket.create_connection((a,80),timeout=4); print(s.recv(100).decode().strip())\n"
        "except OSError:\n"
        " sys.exit(7)\n"
    )
    result = client.exec(["python3", "-c", script], timeout=30)
    return result.stdout.decode().strip() if result.exit_code == 0 else None


def _read_local(port: int) -> bytes | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            return sock.recv(100)
    except OSError:
        return None


def test_forwards_and_an_allow_list_through_the_worker_and_the_refusals_as_events(
    net_site: NetSite, caller_for: Callable[..., Any], vm_dirs: dict[str, Path]
) -> None:
    tag = net_site.netns[-6:]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    commands.create_network(
        caller_for("admin"),
        name=f"closed-{tag}",
        subnet="10.219.12.0/24",
        bridge=f"nbc{tag}",
        isolated=True,
        port_min=port,
        port_max=port,
        default_egress="none",
    )
    operator = caller_for("operator")
    with internet(net_site.netns, f"nbi{tag}", net_site.run_dir):
        accepted = commands.create(
            operator,
            name="guarded",
            template="linux-small",
            network=f"closed-{tag}",
            start_now=False,
        )
        vm = VirtualMachine.objects.get(pk=accepted.vm_id)
        commands.set_egress(operator, vm, egress="allow-list", allow=[APP_DOMAIN])
        vm = VirtualMachine.objects.get(pk=accepted.vm_id)
        forward = commands.add_port_forward(operator, vm, protocol="tcp", guest_port=8080)
        assert forward.host_port == port
        commands.start(operator, VirtualMachine.objects.get(pk=accepted.vm_id))
        vm = _settled(str(vm.pk), "running", "failed")
        assert vm.state == "running", vm.last_error

        client = _agent(vm)
        try:
            assert (_fetch(client, APP_DOMAIN) or "").startswith("ok ")
            assert _fetch(client, str(OTHER_HOST)) is None
            assert _fetch(client, OTHER_DOMAIN) == "nxdomain"

            # The worker's forwarder listens on 127.0.0.1 and relays through the host link.
            server = _serve(client, 8080, "forwarded")
            try:
                got = wait_for(lambda: _read_local(port), 30, "the forward to answer")
                assert got == b"forwarded"
            finally:
                server.join(60)

            commands.remove_port_forward(operator, vm, forward)
            wait_for(lambda: f"dport {port}" not in net_site.ruleset(), 30, "the rule to go")
            wait_for(lambda: _read_local(port) is None, 30, "the listener to close")
        finally:
            client.close()

        # The evidence task (the worker's schedule may have run it already: either way, once).
        vmnet.collect_evidence()
        of_vm = Event.objects.filter(aggregate_id=str(vm.pk))
        refused = of_vm.get(type="net.egress_refused").payload
        assert (str(OTHER_HOST), "tcp", 80) in [
            (r["dst"], r["proto"], r["port"]) for r in refused["refused"]
        ]
        lookups = of_vm.get(type="net.dns_lookups").payload
        assert OTHER_DOMAIN in lookups["refused"] and APP_DOMAIN in lookups["allowed"]
        assert vmnet.collect_evidence() == 0  # each period once
        assert of_vm.filter(type__in=["net.egress_refused", "net.dns_lookups"]).count() == 2

        commands.destroy(operator, VirtualMachine.objects.get(pk=vm.pk))
        _settled(str(vm.pk), "destroyed", timeout=120)
    assert tap.list_taps(net_site.netns) == []
    assert f"vm_{vm.pk.hex}" not in net_site.ruleset()
