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
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from audit.models import Event
from vms import commands
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
