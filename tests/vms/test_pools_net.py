"""Warm pools where VMs get a NIC (vms.pools, vms.vmnet), on real guests, in namespaces of the
test's own: a member waits on a TAP of its own on no bridge; a hand-out gives the VM the MAC and
address its create leased, plugs that TAP into its network's bridge with the VM's rules, and the
guest then reaches what an ordinary VM of that network reaches, and nothing more. A member's
TAP goes with it; nothing is left after a destroy."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.utils.module_loading import import_string

from audit.models import Event
from tests.network.internet import APP_DOMAIN, OTHER_HOST, internet
from tests.served import Served
from tests.vms.test_network_worker import _agent, _fetch, _read_from, _serve
from vms import commands, identity, pools, runtime, vmnet, worker
from vms.models import Network, PoolMember, VirtualMachine
from vms.network import netns, tap

from .conftest import NetHost, Worker, wait_for

pytestmark = [pytest.mark.guest, pytest.mark.django_db(transaction=True)]

TEMPLATE = "linux-small"


def _refill() -> dict[str, int]:
    return import_string("vms.tasks.refill_pools")()


def _master(host: NetHost, ifname: str) -> str | None:
    """The bridge ``ifname`` is a port of, if any."""
    out = subprocess.run(
        ["ip", "-n", host.netns, "-j", "link", "show", "dev", ifname],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return json.loads(out)[0].get("master")


def _network(admin: Any, name: str, subnet: str, bridge: str, **kwargs: Any) -> None:
    commands.create_network(
        admin, name=name, subnet=subnet, bridge=bridge, port_min=30500, port_max=30509, **kwargs
    )


def _hand_out(owner: Any, name: str, network: str) -> VirtualMachine:
    accepted = pools.create(owner, name=name, template=TEMPLATE, network=network)
    assert accepted.pooled is not None, "the create was not served from the pool"
    vm = VirtualMachine.objects.get(pk=accepted.vm_id)
    assert vm.state == "running"
    return vm


def _destroy_all(owner: Any) -> None:
    for vm in VirtualMachine.objects.filter(owner=owner.user).exclude(state="destroyed"):
        accepted = commands.destroy(owner, vm)
        worker.handle(accepted.request.event_id)


def _assert_own_nic(host: NetHost, vm: VirtualMachine, bridge: str) -> None:
    """Started from the pool with the NIC its create leased: MAC and address in the guest, its
    TAP (the member's) on its network's bridge, its rules in place."""
    started = Event.objects.get(aggregate_id=str(vm.pk), type="vm.started").payload
    assert started["from_pool"] is True
    assert started["nic"] == {
        "tap": identity.tap_for(vm.pk),
        "mac": vm.mac,
        "address": f"{vm.ip}/24",
        "netns": host.netns,
    }
    leased = Event.objects.get(aggregate_id=str(vm.pk), type="net.ip_leased").payload
    assert (leased["ip"], leased["mac"]) == (vm.ip, vm.mac)
    assert vm.tap == identity.tap_for(vm.pk) and _master(host, vm.tap) == bridge
    assert f"vm_{vm.pk.hex}" in host.ruleset()
    client = _agent(vm)
    try:
        addr = client.exec(["ip", "-4", "addr", "show", "dev", "eth0"]).stdout.decode()
        assert f"inet {vm.ip}/24" in addr
        mac = client.exec(["cat", "/sys/class/net/eth0/address"]).stdout.decode().strip()
        assert mac == vm.mac
    finally:
        client.close()


def test_members_wait_on_their_own_taps_and_hand_outs_on_an_open_network_reach_each_other(
    net_host: NetHost, caller_for: Callable[..., Any], pool_env: list[str]
) -> None:
    tag = net_host.netns[-6:]
    admin, owner = caller_for("admin"), caller_for("operator")
    _network(admin, f"open-{tag}", "10.219.21.0/24", f"npo{tag}", isolated=False)
    vmnet.setup()  # as the worker does at its start: the namespace and every network's bridge
    commands.set_pool_target(admin, TEMPLATE, 2)
    try:
        assert _refill()["warmed"] == 2
        members = list(PoolMember.objects.values_list("pk", flat=True))
        assert pools.report()["serves_creates_here"] is True
        # Each member has a TAP of its own, on no bridge; the reconciler leaves them alone.
        for member in members:
            assert identity.tap_for(member) in tap.list_taps(net_host.netns)
            assert _master(net_host, identity.tap_for(member)) is None
        assert vmnet.remove_orphans()["taps"] == 0
        assert sorted(tap.list_taps(net_host.netns)) == sorted(identity.tap_for(m) for m in members)

        a = _hand_out(owner, "pool-a", f"open-{tag}")
        b = _hand_out(owner, "pool-b", f"open-{tag}")
        assert {a.pk, b.pk} == set(members)
        assert a.ip != b.ip and a.mac != b.mac
        for vm in (a, b):
            _assert_own_nic(net_host, vm, f"npo{tag}")

        # On a network without port isolation, one reaches the other, as ordinary VMs do.
        client_a, client_b = _agent(a), _agent(b)
        try:
            server = _serve(client_a, 8080, "hello-from-a")
            try:
                assert _read_from(client_b, str(a.ip), 8080) == "hello-from-a"
            finally:
                server.join(60)
        finally:
            client_a.close()
            client_b.close()

        _destroy_all(owner)
        rules = net_host.ruleset()
        assert tap.list_taps(net_host.netns) == []
        assert not any(f"vm_{vm.pk.hex}" in rules for vm in (a, b))
    finally:
        commands.set_pool_target(admin, TEMPLATE, 0)
        _refill()
        _destroy_all(owner)


def test_hand_outs_on_an_isolated_network_keep_its_isolation_and_their_egress_policy(
    net_host: NetHost,
    caller_for: Callable[..., Any],
    pool_env: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tag = net_host.netns[-6:]
    admin, owner = caller_for("admin"), caller_for("operator")
    _network(
        admin,
        f"closed-{tag}",
        "10.219.22.0/24",
        f"npc{tag}",
        isolated=True,
        default_egress="internet",
    )
    vmnet.setup()
    network = f"closed-{tag}"
    commands.set_pool_target(admin, TEMPLATE, 2)
    try:
        with internet(net_host.netns, f"npi{tag}", net_host.run_dir):
            assert _refill()["warmed"] == 2
            a = _hand_out(owner, "iso-a", network)
            b = _hand_out(owner, "iso-b", network)
            for vm in (a, b):
                _assert_own_nic(net_host, vm, f"npc{tag}")
            client_a, client_b = _agent(a), _agent(b)
            try:
                # The network's egress (internet): names resolve through its resolver.
                assert (_fetch(client_a, APP_DOMAIN) or "").startswith("ok ")
                # Port isolation: neither reaches the other.
                server = _serve(client_b, 8080, "hello-from-b")
                try:
                    assert _read_from(client_a, str(b.ip), 8080) is None
                finally:
                    server.join(60)
                # A narrower policy applies to a handed-out VM as to any, with its evidence.
                commands.set_egress(owner, b, egress="allow-list", allow=[APP_DOMAIN])
                assert vmnet.reapply(str(b.pk)) == "applied"
                assert (_fetch(client_b, APP_DOMAIN) or "").startswith("ok ")
                assert _fetch(client_b, str(OTHER_HOST)) is None
            finally:
                client_a.close()
                client_b.close()
            vmnet.collect_evidence()
            refused = Event.objects.get(aggregate_id=str(b.pk), type="net.egress_refused")
            assert (str(OTHER_HOST), "tcp", 80) in [
                (r["dst"], r["proto"], r["port"]) for r in refused.payload["refused"]
            ]

        # A hand-out that fails after its TAP was plugged unplugs it (rules and TAP go), and the
        # VM's start goes to the worker the ordinary way.
        commands.set_pool_target(admin, TEMPLATE, 1)
        assert _refill()["warmed"] == 1
        (member,) = PoolMember.objects.values_list("pk", flat=True)
        monkeypatch.setattr(commands, "record_handout", lambda request, key_id, data: None)
        pool_env.clear()
        failed = pools.create(owner, name="iso-c", template=TEMPLATE, network=network)
        monkeypatch.undo()
        assert failed.pooled is None and failed.vm_id == member
        assert identity.tap_for(member) not in tap.list_taps(net_host.netns)
        assert f"vm_{member.hex}" not in net_host.ruleset()
        assert "vms.tasks.run_request" in pool_env

        # A member whose TAP is gone is evicted (and another warmed); an evicted member's TAP
        # goes with its VMM.
        assert _refill()["warmed"] == 1
        (member,) = PoolMember.objects.values_list("pk", flat=True)
        assert tap.delete(net_host.netns, identity.tap_for(member))
        assert _refill() == {"evicted": 1, "warmed": 1, "failed": 0, "busy": 0}
        evicted = Event.objects.get(aggregate_id=str(member), type="pool.vm_evicted")
        assert evicted.payload["reason"].startswith("it has no TAP")
        assert not runtime.hypervisor().is_alive(runtime.runtime_dir(member))
        (member,) = PoolMember.objects.values_list("pk", flat=True)
        assert identity.tap_for(member) in tap.list_taps(net_host.netns)
        commands.set_pool_target(admin, TEMPLATE, 0)
        assert _refill()["evicted"] == 1
        assert not runtime.hypervisor().is_alive(runtime.runtime_dir(member))
        assert identity.tap_for(member) not in tap.list_taps(net_host.netns)

        _destroy_all(owner)
        assert tap.list_taps(net_host.netns) == []
        assert "vm_" not in net_host.ruleset()
    finally:
        commands.set_pool_target(admin, TEMPLATE, 0)
        _refill()
        _destroy_all(owner)


def test_a_network_whose_bridge_is_not_in_place_gets_no_member(
    net_host: NetHost,
    caller_for: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    vm_dirs: Any,
) -> None:
    """A network made after the worker set networking up has no bridge until its first VM's
    start (the worker's): a hand-out, which mends nothing of the namespace, would fail there, so
    its creates go the ordinary way and the member stays in its pool."""
    from vms import enqueue, images
    from vms.models import Template

    queued: list[str] = []
    monkeypatch.setattr(enqueue, "async_task", lambda func, *a, **kw: queued.append(func))
    monkeypatch.setattr(images, "current_image_id", lambda: "img")
    tag = net_host.netns[-6:]
    admin, owner = caller_for("admin"), caller_for("operator")
    commands.ensure_default_network()  # made at migrate outside the tests
    vmnet.setup()
    _network(admin, f"late-{tag}", "10.219.23.0/24", f"npl{tag}", isolated=True)
    commands.set_pool_target(admin, TEMPLATE, 1)
    tpl = Template.objects.get(name=TEMPLATE)
    member = commands.record_pool_warming(tpl, runtime.host_name(), "img")
    assert member is not None
    commands.record_pool_warmed(member, {"paused": True})

    late = pools.create(owner, name="late", template=TEMPLATE, network=f"late-{tag}")
    assert late.pooled is None and late.vm_id != member
    assert "vms.tasks.run_request" in queued
    assert PoolMember.objects.filter(pk=member, state="ready").exists()
    # On the default network, whose bridge the set-up made, the member is handed out.
    assert vmnet.network_in_place(Network.objects.get(is_default=True))
    taken = commands.create(owner, name="served", template=TEMPLATE, from_pool=pools._serves(None))
    assert taken.pooled is not None and taken.vm_id == member


def test_served_with_networking_a_create_is_handed_a_member_with_its_address(
    net_host: NetHost,
    worker_env: dict[str, str],
    make_user: Callable[..., Any],
    issue_token: Callable[..., str],
    tmp_path: Path,
) -> None:
    """As `make run` serves it as root: the worker (networking on) warms a member on a TAP of
    its own; the web process hands it to a user's create (201, running), plugs its NIC, and the
    guest has the VM's address; destroyed, nothing is left in the namespace."""
    commands.ensure_default_network()  # made at migrate outside the tests
    worker_env.update(net_host.env)
    web_env = {
        k: worker_env[k]
        for k in (
            "SANDBOX_RUNTIME_DIR",
            "SANDBOX_SNAPSHOT_DIR",
            "SANDBOX_VM_DATA_DIR",
            "SANDBOX_HYPERVISOR",
            "SANDBOX_DIGEST_SINK_DIR",
        )
    }
    w = Worker(worker_env, tmp_path / "worker.log")
    server = Served(tmp_path / "serve.log", **web_env, **net_host.env)
    headers = {"Accept": "application/json"}
    admin = httpx.Client(
        base_url=server.url,
        headers={**headers, "Authorization": f"Bearer {issue_token(make_user('admin'))}"},
        timeout=120,
    )
    user = httpx.Client(
        base_url=server.url,
        headers={**headers, "Authorization": f"Bearer {issue_token(make_user('operator'))}"},
        timeout=120,
    )

    def ready() -> int:
        pools_now = admin.get("/api/v1/pools/").json()["pools"]
        return sum(p["ready"] for p in pools_now if p["template"] == TEMPLATE)

    try:
        w.start()
        server.wait_ready()
        wait_for(lambda: netns.exists(net_host.netns), 60, "the worker to set up its namespace")
        assert admin.put(f"/api/v1/pools/{TEMPLATE}/", json={"target": 1}).status_code == 200
        wait_for(lambda: ready() == 1, 300, "a ready member")
        (member,) = PoolMember.objects.values_list("pk", flat=True)
        assert identity.tap_for(member) in tap.list_taps(net_host.netns)

        made = user.post("/api/v1/vms/", json={"name": "net-warm", "template": TEMPLATE})
        assert made.status_code == 201, made.text
        vm = VirtualMachine.objects.get(pk=member)
        assert vm.state == "running" and vm.ip
        ran = user.post(
            f"/api/v1/vms/{vm.pk}/exec/", json={"argv": ["ip", "-4", "addr", "show", "eth0"]}
        )
        assert ran.status_code == 200, ran.text
        assert f"inet {vm.ip}/" in ran.json()["stdout"]
        assert _master(net_host, vm.tap) == Network.objects.get(is_default=True).bridge

        assert user.delete(f"/api/v1/vms/{vm.pk}/").status_code in (200, 202)
        assert admin.put(f"/api/v1/pools/{TEMPLATE}/", json={"target": 0}).status_code == 200
        wait_for(
            lambda: (
                not PoolMember.objects.exists()
                and VirtualMachine.objects.get(pk=member).state == "destroyed"
            ),
            120,
            "the VM destroyed and the pool emptied",
        )
        wait_for(lambda: tap.list_taps(net_host.netns) == [], 30, "every TAP to go")
    finally:
        admin.close()
        user.close()
        server.stop()
        w.stop()
