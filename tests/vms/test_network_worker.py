"""Sandbox networking through the real worker, with real QEMU guests.

The worker process is given a product namespace, a host link subnet and a namespace standing in
for the host, all of this test's own (named per run, removed afterwards even on failure): it sets
them up at start, plugs each VM's NIC when the VM starts and unplugs it at destroy. Traffic goes
only between the guests and those namespaces.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.db import connections

from accounts.caller import Caller
from audit.models import Event
from tests.network.internet import (
    APP_DOMAIN,
    OTHER_DOMAIN,
    OTHER_HOST,
    internet,
)
from tests.preview.conftest import bearer, grant_cookie, preview_host, serve_previews, share
from vms import commands, vmnet
from vms.agent import credentials
from vms.agent.client import AgentClient
from vms.hypervisors.qemu import QemuHypervisor
from vms.models import Quota, Snapshot, VirtualMachine
from vms.network import netns, tap
from vms.runtime import runtime_dir

from .conftest import NetHost, Worker, wait_for

pytestmark = [pytest.mark.guest, pytest.mark.django_db(transaction=True)]


@dataclass
class NetSite:
    netns: str
    host_ns: str
    run_dir: Path
    worker: Worker
    env: dict[str, str]  # the networking settings the worker was given
    host: NetHost

    def links(self) -> str:
        return self.host.links()

    def ruleset(self) -> str:
        return self.host.ruleset()


def _out(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout


@pytest.fixture
def net_site(net_host: NetHost, worker_env: dict[str, str], tmp_path: Path) -> Iterator[NetSite]:
    worker_env.update(net_host.env)
    w = Worker(worker_env, tmp_path / "worker.log")
    try:
        w.start()
        wait_for(lambda: netns.exists(net_host.netns), 60, "the worker to set up its namespace")
        yield NetSite(net_host.netns, net_host.host_ns, net_host.run_dir, w, net_host.env, net_host)
    finally:
        w.stop()


def _agent(vm: VirtualMachine) -> AgentClient:
    hv, rt = QemuHypervisor(), runtime_dir(vm.pk)
    client = AgentClient(
        lambda: hv.agent_connect(rt, 2.0),
        timeout=30.0,
        name=rt.root.name,
        credential=credentials.for_vm(vm.pk),
    )
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


def _start_web_server(client: AgentClient, port: int, text: str) -> None:
    """An HTTP server in the guest (``python3 -m http.server``, left running), whose page is
    ``text``; returns once the guest reaches it on its own address."""
    root = f"/tmp/www-{port}"
    script = (
        f"mkdir -p {root} && printf %s {text} > {root}/index.html && "
        f"(python3 -m http.server {port} --bind 0.0.0.0 --directory {root} "
        "</dev/null >/dev/null 2>&1 &)"
    )
    assert client.exec(["sh", "-c", script], timeout=30).exit_code == 0
    wait_for(lambda: _http_get(client, "127.0.0.1", port) == text, 60, "the guest's web server")


def _http_get(client: AgentClient, address: str, port: int) -> str | None:
    """From the guest: the page at ``http://address:port/`` (None when it cannot be had)."""
    script = (
        "import sys,urllib.request\n"
        "try:\n"
        f" sys.stdout.write(urllib.request.urlopen('http://{address}:{port}/',timeout=4)"
        ".read().decode())\n"
        "except OSError:\n"
        " sys.exit(7)\n"
    )
    result = client.exec(["python3", "-c", script], timeout=30)
    return result.stdout.decode() if result.exit_code == 0 else None


def test_preview_urls_reach_guests_through_the_host_link_and_two_networks_never_meet(
    net_site: NetSite,
    caller_for: Callable[..., Any],
    make_user: Callable[..., Any],
    issue_token: Callable[..., str],
    vm_dirs: dict[str, Path],
    tmp_path: Path,
) -> None:
    """The served product (web only, given the networking settings) proxies a preview URL to a
    real guest through the worker's host link, for whoever may see the VM; guests on two
    networks do not reach each other, even when each one's egress allows the other's subnet."""
    tag = net_site.netns[-6:]
    admin = caller_for("admin")
    subnets = {"a": "10.219.13.0/24", "b": "10.219.14.0/24"}
    for i, (side, subnet) in enumerate(subnets.items()):
        commands.create_network(
            admin,
            name=f"{side}-{tag}",
            subnet=subnet,
            bridge=f"nb{side}{tag}",
            isolated=False,
            port_min=30200 + 50 * i,
            port_max=30249 + 50 * i,
            default_egress="none",
        )
    owner, stranger = make_user("operator"), make_user("operator")
    caller = Caller.for_user(owner, channel="api")
    vms = {}
    for side, other in (("a", "b"), ("b", "a")):
        accepted = commands.create(
            caller, name=f"web-{side}", template="linux-small", network=f"{side}-{tag}",
            start_now=False,
        )  # fmt: skip
        vm = VirtualMachine.objects.get(pk=accepted.vm_id)
        commands.set_egress(caller, vm, egress="allow-list", allow=[subnets[other]])
        commands.start(caller, VirtualMachine.objects.get(pk=accepted.vm_id))
        vms[side] = accepted.vm_id
    a, b = (_settled(str(vms[side]), "running", "failed") for side in ("a", "b"))
    assert (a.state, b.state) == ("running", "running"), (a.last_error, b.last_error)

    def namespaces() -> list[tuple[str, int]]:  # this test's, each with its identity
        return sorted(
            (n, (netns.NETNS_DIR / n).stat().st_ino)
            for n in os.listdir(netns.NETNS_DIR)
            if n.endswith(tag)
        )

    before = namespaces()
    host_links = _out(["ip", "-n", net_site.host_ns, "-br", "link"])
    served = serve_previews(
        tmp_path / "serve.log", SANDBOX_PREVIEW_READ_TIMEOUT_S="30", **net_site.env
    )
    client_a, client_b = _agent(a), _agent(b)
    try:
        served.wait_ready()
        _start_web_server(client_a, 8000, f"page-of-a-{tag}")
        _start_web_server(client_b, 8000, f"page-of-b-{tag}")

        with httpx.Client(
            base_url=served.url, follow_redirects=False, trust_env=False, timeout=60
        ) as http:

            def get(vm: VirtualMachine, path: str = "/", **headers: str) -> httpx.Response:
                http.cookies.clear()
                return http.get(path, headers={"Host": preview_host(vm, 8000, served), **headers})

            token = issue_token(owner)
            page = get(a, **bearer(token))
            assert (page.status_code, page.text) == (200, f"page-of-a-{tag}")
            assert get(b, **bearer(token)).text == f"page-of-b-{tag}"
            # Another operator may not see the VM: it looks like a missing one.
            assert get(a, **bearer(issue_token(stranger))).status_code == 404
            assert get(a).status_code == 401

            link = share(token, a, 8000, served, expires_in=600)
            opened = get(a, link)
            assert opened.status_code == 303
            page = get(a, Cookie=grant_cookie(opened))
            assert (page.status_code, page.text) == (200, f"page-of-a-{tag}")
            short = share(token, a, 8000, served, expires_in=1)
            time.sleep(2.2)
            expired = get(a, short)
            assert expired.status_code == 403 and "expired" in expired.text

        # Serving made or remade no namespace and touched nothing of the host link, and it did
        # not set networking up ("network namespace ... taken over"): only the worker does.
        assert namespaces() == before
        assert _out(["ip", "-n", net_site.host_ns, "-br", "link"]) == host_links
        assert "network namespace" not in served.log.read_text()

        # Two networks never meet, whatever the egress allows; each guest reaches its own page.
        assert _http_get(client_a, str(b.ip), 8000) is None
        assert _http_get(client_b, str(a.ip), 8000) is None
        assert _http_get(client_a, str(a.ip), 8000) == f"page-of-a-{tag}"
    finally:
        served.stop()
        client_a.close()
        client_b.close()

    for vm in (a, b):
        commands.destroy(caller, VirtualMachine.objects.get(pk=vm.pk))
    for vm in (a, b):
        _settled(str(vm.pk), "destroyed", timeout=120)
    assert tap.list_taps(net_site.netns) == []


def test_a_snapshot_taken_without_networking_restores_without_a_nic_until_a_cold_start(
    net_site: NetSite,
    caller_for: Callable[..., Any],
    worker_env: dict[str, str],
    tmp_path: Path,
    vm_dirs: dict[str, Path],
) -> None:
    """As after an upgrade, or a first run without root: a VM's snapshot has no NIC. Restored
    where networking is on, the guest runs without one (the outcome says so) instead of failing
    the driver's shape check; its next cold start plugs its NIC."""
    operator = caller_for("operator")
    net_site.worker.stop()  # a worker without networking takes the snapshot
    plain = Worker({**worker_env, "SANDBOX_NETWORKING": "off"}, tmp_path / "plain.log")
    plain.start()
    try:
        vm_id = str(commands.create(operator, name="before", template="linux-small").vm_id)
        vm = _settled(vm_id, "running", "failed")
        assert vm.state == "running", vm.last_error
        commands.snapshot(operator, vm, name="plain")
        vm = _settled(vm_id, "running", "failed")
        snap = Snapshot.objects.get(vm_id=vm_id, name="plain")
        assert snap.state == Snapshot.State.READY
    finally:
        plain.stop()
    net_site.worker.start()

    commands.restore(operator, VirtualMachine.objects.get(pk=vm_id), snap)
    vm = _settled(vm_id, "running", "failed")
    assert vm.state == "running", vm.last_error
    restored = Event.objects.filter(aggregate_id=vm_id, type="vm.restored").get().payload
    assert "without a NIC" in restored["nic_absent"]
    assert vm.tap not in net_site.links() and f"vm_{vm.pk.hex}" not in net_site.ruleset()
    client = _agent(vm)
    try:
        assert client.exec(["hostname"]).stdout.decode().strip() == vm.hostname
    finally:
        client.close()

    commands.stop(operator, vm, force=True)
    _settled(vm_id, "stopped", timeout=120)
    commands.start(operator, VirtualMachine.objects.get(pk=vm_id))
    vm = _settled(vm_id, "running", "failed")
    assert vm.state == "running", vm.last_error
    assert vm.tap in net_site.links()
    client = _agent(vm)
    try:
        addr = client.exec(["ip", "-4", "addr", "show", "dev", "eth0"]).stdout.decode()
        assert f"inet {vm.ip}/" in addr
    finally:
        client.close()
    commands.destroy(operator, VirtualMachine.objects.get(pk=vm_id))
    _settled(vm_id, "destroyed", timeout=120)
    assert tap.list_taps(net_site.netns) == []


def test_a_vm_suspended_to_disk_by_its_idle_policy_comes_back_with_its_nic_and_address(
    net_site: NetSite, caller_for: Callable[..., Any], vm_dirs: dict[str, Path]
) -> None:
    """The worker's idle tick suspends a VM with a NIC to disk: its VMM and its NIC go (TAP,
    rules); its owner's resume restores it from the file with a NIC plugged again, and the
    guest has its address: another VM reaches a server it ran before the suspend."""
    admin = caller_for("admin")
    tag = net_site.netns[-6:]
    commands.create_network(
        admin,
        name=f"idle-{tag}",
        subnet="10.219.12.0/24",
        bridge=f"nbi{tag}",
        isolated=False,
        port_min=30200,
        port_max=30300,
        default_egress="none",
    )
    operator = caller_for("operator")
    ids = [
        commands.create(
            operator, name=f"idle-{i}", template="linux-small", network=f"idle-{tag}"
        ).vm_id
        for i in range(2)
    ]
    a, b = (_settled(str(i), "running", "failed") for i in ids)
    assert (a.state, b.state) == ("running", "running"), (a.last_error, b.last_error)
    client_a = _agent(a)
    try:
        # A server started before the suspend, in the background: the restored guest still has it.
        script = (
            "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
            "s.bind(('0.0.0.0',8090));s.listen(1);c,_=s.accept();c.sendall(b'kept-a');c.close()"
        )
        started = client_a.exec(
            ["sh", "-c", f'setsid python3 -c "{script}" </dev/null >/dev/null 2>&1 &']
        )
        assert started.exit_code == 0, started.stderr
    finally:
        client_a.close()
    commands.set_idle(operator, a, idle_timeout_s=1, idle_to_disk=True)

    def suspended() -> VirtualMachine | None:
        vm = VirtualMachine.objects.get(pk=a.pk)
        return vm if vm.suspended_to_disk and not vm.pending_request else None

    a = wait_for(suspended, 120, "the idle tick to suspend the VM to disk", interval=0.3)
    assert a.state == "paused" and a.idle_paused
    assert a.tap not in net_site.links()
    assert f"vm_{a.pk.hex}" not in net_site.ruleset()
    commands.set_idle(operator, a, idle_timeout_s=None)  # not suspended again once resumed

    commands.resume(operator, VirtualMachine.objects.get(pk=a.pk))
    a = _settled(str(a.pk), "running", "paused", "failed")
    assert (a.state, a.suspended_to_disk) == ("running", False), a.last_error
    resumed = Event.objects.filter(aggregate_id=str(a.pk), type="vm.resumed").get().payload
    assert resumed["from_disk"] is True
    assert a.tap in net_site.links()
    client_b = _agent(b)
    try:
        assert _read_from(client_b, str(a.ip), 8090) == "kept-a"
    finally:
        client_b.close()
    for vm_id in ids:
        commands.destroy(operator, VirtualMachine.objects.get(pk=vm_id))
    for vm_id in ids:
        _settled(str(vm_id), "destroyed", timeout=120)
    assert tap.list_taps(net_site.netns) == []


def test_twenty_concurrent_creates_get_twenty_addresses_and_destroy_leaves_nothing(
    net_site: NetSite, make_user: Callable[..., Any], vm_dirs: dict[str, Path]
) -> None:
    """20 creates at once, started by the worker from the template: 20 distinct addresses, 20
    TAPs and 20 VMs' rules in the namespace; destroyed, every TAP and rule is gone (``ip`` and
    ``nft list ruleset`` in the namespace) and every address is released."""
    user = make_user("admin")
    Quota.objects.create(user=user, max_vms=20, max_vcpus=100, max_memory_mib=1 << 20)
    caller = Caller.for_user(user, channel="api")
    barrier = threading.Barrier(20)

    def create(i: int) -> str:
        try:
            barrier.wait(timeout=30)
            return str(commands.create(caller, name=f"many-{i}", template="linux-small").vm_id)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(create, range(20)))
    vms = [_settled(vm_id, "running", "failed", timeout=600) for vm_id in ids]
    assert [vm.state for vm in vms] == ["running"] * 20, [vm.last_error for vm in vms]
    addresses = {str(vm.ip) for vm in vms}
    assert len(addresses) == 20 and "None" not in addresses
    links, rules = net_site.links(), net_site.ruleset()
    assert sorted(tap.list_taps(net_site.netns)) == sorted(vm.tap for vm in vms)
    for vm in vms:
        assert vm.tap in links and f"vm_{vm.pk.hex}" in rules and str(vm.ip) in rules

    def destroy(vm: VirtualMachine) -> None:
        try:
            commands.destroy(caller, VirtualMachine.objects.get(pk=vm.pk))
        finally:
            connections.close_all()

    with ThreadPoolExecutor(20) as pool:
        list(pool.map(destroy, vms))
    for vm_id in ids:
        _settled(vm_id, "destroyed", timeout=300)
    rules = net_site.ruleset()
    assert tap.list_taps(net_site.netns) == []
    assert not any(f"vm_{vm.pk.hex}" in rules or str(vm.ip) in rules for vm in vms)
    released = Event.objects.filter(type="net.ip_released", aggregate_id__in=ids)
    assert sorted(e.payload["ip"] for e in released) == sorted(addresses)
    assert not VirtualMachine.objects.filter(pk__in=ids, ip__isnull=False).exists()
