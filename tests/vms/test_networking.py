"""Networks, address leases, port forwards and egress policies (the records; the host side is
tested with vms/network): each change is an event, the read models are its projection, bad
input is a 400 with nothing changed, and who may do what is the policy's."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import connections

from audit import projections
from audit.models import Event
from vms import commands, netconfig
from vms.models import Network, PortForward, Quota, VirtualMachine

pytestmark = pytest.mark.django_db


def _settle(result: commands.Accepted, outcome: str, **data: Any) -> None:
    assert commands.record_outcome(result.request, outcome, data) is not None


def _running(caller, name: str = "box") -> VirtualMachine:
    accepted = commands.create(caller, name=name, template="linux-small")
    _settle(accepted, "vm.started", host="h1", hypervisor="qemu")
    return VirtualMachine.objects.get(pk=accepted.vm_id)


def _events(vm: VirtualMachine, prefix: str = "net.") -> list[Event]:
    return list(
        Event.objects.filter(aggregate_id=str(vm.pk), type__startswith=prefix).order_by("position")
    )


def _data(event: Event) -> dict[str, Any]:
    return json.loads(event.data)


def _changes() -> int:
    return Event.objects.count()


# --- The default network and leases --------------------------------------------------------------


def test_the_default_network_is_made_from_the_settings_once(settings) -> None:
    settings.SANDBOX_NETWORK_CIDR = "10.31.0.0/24"
    settings.SANDBOX_NETWORK_BRIDGE = "sbxbr9"
    settings.SANDBOX_NETWORK_PORTS = "30000-30009"
    first = commands.ensure_default_network()
    again = commands.ensure_default_network()
    assert first.pk == again.pk and Network.objects.count() == 1
    assert (first.subnet, first.gateway, first.bridge) == ("10.31.0.0/24", "10.31.0.1", "sbxbr9")
    assert (first.port_min, first.port_max, first.is_default) == (30000, 30009, True)
    created = Event.objects.filter(type="net.network_created")
    assert created.count() == 1 and _data(created.get())["subnet"] == "10.31.0.0/24"


def test_the_default_network_after_migrate_outside_the_tests(settings) -> None:
    from django.apps import apps
    from django.db.models.signals import post_migrate

    settings.TESTING = False
    post_migrate.send(sender=apps.get_app_config("vms"), app_config=apps.get_app_config("vms"))
    post_migrate.send(sender=apps.get_app_config("vms"), app_config=apps.get_app_config("vms"))
    assert Network.objects.filter(is_default=True).count() == 1
    assert Event.objects.filter(type="net.network_created").count() == 1


def test_a_create_leases_an_address_of_its_network(caller_for) -> None:
    caller = caller_for("operator")
    vm = commands.create(caller, name="a", template="linux-small", start_now=False).vm
    network = Network.objects.get(is_default=True)
    assert vm.network_id == network.pk and vm.ip == "10.250.0.2"
    assert vm.tap == "t" + vm.pk.hex[:12] and vm.egress == network.default_egress
    (leased,) = _events(vm)
    assert leased.type == "net.ip_leased"
    assert _data(leased) == {
        "ip": "10.250.0.2",
        "mac": vm.mac,
        "network_id": str(network.pk),
        "network": network.name,
    }


@pytest.mark.django_db(transaction=True)
def test_concurrent_creates_get_distinct_addresses(make_user) -> None:
    from accounts.caller import Caller

    user = make_user("admin")
    Quota.objects.create(user=user, max_vms=20, max_vcpus=100, max_memory_mib=1 << 20)
    caller = Caller.for_user(user, channel="api")
    commands.ensure_default_network()
    barrier = threading.Barrier(20)

    def create(i: int) -> str:
        try:
            barrier.wait(timeout=20)
            return commands.create(caller, name=f"c{i}", template="linux-small").vm_id.hex
        finally:
            connections.close_all()

    with ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(create, range(20)))
    ips = list(VirtualMachine.objects.filter(pk__in=ids).values_list("ip", flat=True))
    assert len(ips) == 20 and None not in ips and len(set(ips)) == 20
    leases = Event.objects.filter(type="net.ip_leased")
    assert sorted(_data(e)["ip"] for e in leases) == sorted(ips)


def test_an_address_is_free_again_only_after_its_release(caller_for, settings) -> None:
    settings.SANDBOX_NETWORK_CIDR = "10.9.0.0/29"  # gateway .1, VMs .2 to .6
    caller = caller_for("admin")
    vms = [
        commands.create(caller, name=f"v{i}", template="linux-small", start_now=False).vm
        for i in range(5)
    ]
    doomed = vms[1]
    destroying = commands.destroy(caller, doomed)
    # Asked to go, not gone: the address is still its own.
    with pytest.raises(ValidationError, match="no free address"):
        commands.create(caller, name="early", template="linux-small", start_now=False)
    _settle(destroying, "vm.destroyed")
    types = [e.type for e in _events(doomed, "")][-2:]
    assert types == ["vm.destroyed", "net.ip_released"]
    assert _data(_events(doomed)[-1]) == {"ip": "10.9.0.3", "network_id": str(doomed.network_id)}
    again = commands.create(caller, name="later", template="linux-small", start_now=False).vm
    assert again.ip == "10.9.0.3"


# --- Port forwards -------------------------------------------------------------------------------


def test_a_forward_takes_the_lowest_free_host_port_and_is_an_event(caller_for) -> None:
    caller = caller_for("operator")
    vm = _running(caller)
    network = Network.objects.get(pk=vm.network_id)
    first = commands.add_port_forward(caller, vm, protocol="tcp", guest_port=22)
    second = commands.add_port_forward(caller, vm, protocol="tcp", guest_port=80)
    udp = commands.add_port_forward(caller, vm, protocol="udp", guest_port=53)
    assert [first.host_port, second.host_port] == [network.port_min, network.port_min + 1]
    assert udp.host_port == network.port_min  # another protocol, another port space
    added = [e for e in _events(vm) if e.type == "net.port_forward_added"]
    assert _data(added[0]) == {
        "forward_id": str(first.pk),
        "protocol": "tcp",
        "guest_port": 22,
        "host_port": network.port_min,
        "network_id": str(network.pk),
    }
    commands.remove_port_forward(caller, vm, first)
    assert not PortForward.objects.filter(pk=first.pk).exists()
    assert _events(vm)[-1].type == "net.port_forward_removed"
    # The freed port is the lowest free one again.
    assert commands.add_port_forward(caller, vm, protocol="tcp", guest_port=8080).host_port == (
        network.port_min
    )


def test_a_host_port_is_given_once_across_networks(caller_for) -> None:
    admin = caller_for("admin")
    commands.ensure_default_network()
    commands.create_network(
        admin, name="lab", subnet="10.60.0.0/24", bridge="labbr0", port_min=10000, port_max=10001
    )
    a = _running(admin, "a")
    b_accepted = commands.create(admin, name="b", template="linux-small", network="lab")
    b = VirtualMachine.objects.get(pk=b_accepted.vm_id)
    assert b.ip == "10.60.0.2"
    taken = commands.add_port_forward(admin, a, protocol="tcp", guest_port=22).host_port
    assert taken == 10000
    before = _changes()
    with pytest.raises(ValidationError, match="forwarded already"):
        commands.add_port_forward(admin, b, protocol="tcp", guest_port=22, host_port=10000)
    assert commands.add_port_forward(admin, b, protocol="tcp", guest_port=22).host_port == 10001
    with pytest.raises(ValidationError, match="no free tcp port"):
        commands.add_port_forward(admin, b, protocol="tcp", guest_port=23)
    assert _changes() == before + 1


@pytest.mark.django_db(transaction=True)
def test_concurrent_forwards_never_share_a_host_port(make_user) -> None:
    from accounts.caller import Caller

    user = make_user("admin")
    caller = Caller.for_user(user, channel="api")
    vms = [_running(caller, f"f{i}") for i in range(4)]
    barrier = threading.Barrier(16)

    def add(i: int) -> int:
        try:
            barrier.wait(timeout=20)
            vm = VirtualMachine.objects.get(pk=vms[i % 4].pk)
            for _ in range(5):  # a stale VM version: read it again and retry
                try:
                    return commands.add_port_forward(
                        caller, vm, protocol="tcp", guest_port=1000 + i
                    ).host_port
                except Exception as exc:  # noqa: BLE001
                    if "version" not in str(exc):
                        raise
                    vm = VirtualMachine.objects.get(pk=vm.pk)
            raise AssertionError("no forward after retries")
        finally:
            connections.close_all()

    with ThreadPoolExecutor(16) as pool:
        ports = list(pool.map(add, range(16)))
    assert len(set(ports)) == 16
    stored = list(PortForward.objects.values_list("host_port", flat=True))
    assert sorted(stored) == sorted(ports)


def test_forward_input_is_checked_with_nothing_changed(caller_for) -> None:
    caller = caller_for("operator")
    vm = _running(caller)
    network = Network.objects.get(pk=vm.network_id)
    before = _changes()
    bad = [
        ({"protocol": "icmp", "guest_port": 22}, "protocol"),
        ({"protocol": "tcp", "guest_port": 0}, "guest_port"),
        ({"protocol": "tcp", "guest_port": 70000}, "guest_port"),
        ({"protocol": "tcp", "guest_port": 22, "host_port": network.port_max + 1}, "host_port"),
    ]
    for params, field in bad:
        with pytest.raises(ValidationError) as caught:
            commands.add_port_forward(caller, vm, **params)
        assert field in caught.value.message_dict
    assert _changes() == before and not PortForward.objects.exists()


def test_forwards_per_vm_are_limited_by_the_setting(caller_for, settings) -> None:
    settings.SANDBOX_NET_MAX_FORWARDS_PER_VM = 2
    caller = caller_for("operator")
    vm = _running(caller)
    for port in (22, 80):
        commands.add_port_forward(caller, vm, protocol="tcp", guest_port=port)
    before = _changes()
    with pytest.raises(ValidationError, match="at most 2 port forwards"):
        commands.add_port_forward(caller, vm, protocol="udp", guest_port=53)
    assert _changes() == before and PortForward.objects.filter(vm=vm).count() == 2


def test_networking_follows_its_setting_when_it_changes(settings) -> None:
    for mode, on in (("on", True), ("off", False), ("on", True)):
        settings.SANDBOX_NETWORKING = mode
        assert netconfig.networking_enabled() is on


def test_a_destroyed_vm_gives_back_its_forwards(caller_for) -> None:
    caller = caller_for("operator")
    vm = _running(caller)
    forward = commands.add_port_forward(caller, vm, protocol="tcp", guest_port=22)
    vm.refresh_from_db()
    _settle(commands.destroy(caller, vm), "vm.destroyed")
    assert not PortForward.objects.exists()
    removed = [e for e in _events(vm) if e.type == "net.port_forward_removed"]
    assert _data(removed[0])["forward_id"] == str(forward.pk)
    assert _data(removed[0])["reason"] == "destroyed"


# --- Egress ----------------------------------------------------------------------------------------


def test_egress_policy_change_is_an_event_with_the_previous_policy(caller_for) -> None:
    caller = caller_for("operator")
    vm = _running(caller)
    commands.set_egress(
        caller, vm, egress="allow-list", allow=["10.1.2.0/24", "Example.COM.", "1.1.1.1"]
    )
    vm.refresh_from_db()
    assert vm.egress == "allow-list"
    assert vm.egress_allow == ["10.1.2.0/24", "example.com", "1.1.1.1/32"]
    event = _events(vm)[-1]
    assert event.type == "net.egress_policy_changed"
    assert _data(event)["previous"] == {"egress": "none", "allow": []}
    assert _data(event)["allow"] == vm.egress_allow


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"egress": "everything"}, "egress"),
        ({"egress": "allow-list", "allow": ["10.1.2.3/24"]}, "allow"),  # host bits set
        ({"egress": "allow-list", "allow": ["*.example.com"]}, "allow"),
        ({"egress": "allow-list", "allow": ["exa mple.com"]}, "allow"),
        ({"egress": "allow-list", "allow": ["0.0.0.0/0"]}, "allow"),
        ({"egress": "allow-list", "allow": ["a;b.com"]}, "allow"),
        ({"egress": "allow-list", "allow": [f"h{i}.example.com" for i in range(65)]}, "allow"),
        ({"egress": "internet", "allow": ["example.com"]}, "allow"),
    ],
)
def test_bad_egress_input_is_refused_with_nothing_changed(caller_for, params, field) -> None:
    caller = caller_for("operator")
    vm = _running(caller)
    before = _changes()
    with pytest.raises(ValidationError) as caught:
        commands.set_egress(caller, vm, **params)
    assert field in caught.value.message_dict
    assert _changes() == before
    vm.refresh_from_db()
    assert (vm.egress, vm.egress_allow) == ("none", [])


def test_net_evidence_is_bounded_per_period(caller_for, settings) -> None:
    settings.SANDBOX_NET_EVIDENCE_MAX_ROWS = 2
    caller = caller_for("operator")
    vm = _running(caller)
    refused = [
        {"dst": f"203.0.113.{i}", "proto": "tcp", "port": 443, "packets": i} for i in range(5)
    ]
    events = commands.record_net_evidence(
        str(vm.pk),
        since="2026-11-30T00:00:00Z",
        until="2026-11-30T00:01:00Z",
        refused=refused,
        lookups_allowed={"example.com": 3},
        lookups_refused={"a.test": 1, "b.test": 5, "c.test": 2},
    )
    assert [e.type for e in events] == ["net.egress_refused", "net.dns_lookups"]
    assert [r["packets"] for r in events[0].data["refused"]] == [4, 3]
    assert events[0].data["more"] == 3
    assert events[1].data["refused"] == {"b.test": 5, "c.test": 2}
    assert events[1].data["more"] == 1
    assert commands.record_net_evidence(str(vm.pk), since="a", until="b") == []


# --- Networks --------------------------------------------------------------------------------------


def test_networks_are_checked_and_their_changes_are_events(caller_for) -> None:
    admin = caller_for("admin")
    commands.ensure_default_network()
    before = _changes()
    bad = [
        ({"subnet": "8.8.8.0/24"}, "subnet"),  # not private
        ({"subnet": "10.250.0.0/25"}, "subnet"),  # overlaps the default
        ({"subnet": "10.61.0.0/30"}, "subnet"),  # too small
        ({"subnet": "10.61.0.1/24"}, "subnet"),  # host bits
        ({"bridge": "br 0"}, "bridge"),
        ({"bridge": "chbr0"}, "bridge"),  # the default's
        ({"port_min": 3000, "port_max": 2000}, "port_max"),
        ({"default_egress": "all"}, "default_egress"),
        ({"name": "Bad Name"}, "name"),
    ]
    good = {"name": "lab", "subnet": "10.61.0.0/24", "bridge": "labbr0"}
    good |= {"port_min": 21000, "port_max": 21999}
    for change, field in bad:
        with pytest.raises(ValidationError) as caught:
            commands.create_network(admin, **(good | change))
        assert field in caught.value.message_dict, (change, caught.value)
    assert _changes() == before
    lab = commands.create_network(admin, **good, is_default=True)
    assert lab.gateway == "10.61.0.1" and lab.is_default
    assert Network.objects.filter(is_default=True).get().pk == lab.pk
    lab = commands.update_network(admin, lab, isolated=False, default_egress="internet")
    assert (lab.isolated, lab.default_egress) == (False, "internet")
    types = list(Event.objects.filter(position__gt=before).values_list("type", flat=True))
    assert types == ["net.network_updated", "net.network_created", "net.network_updated"]
    with pytest.raises(ValidationError, match="default"):
        commands.delete_network(admin, lab)


def test_a_network_with_vms_keeps_its_subnet_and_is_not_deleted(caller_for) -> None:
    admin = caller_for("admin")
    commands.ensure_default_network()
    lab = commands.create_network(
        admin, name="lab", subnet="10.62.0.0/24", bridge="labbr1", port_min=22000, port_max=22010
    )
    accepted = commands.create(admin, name="on-lab", template="linux-small", network="lab")
    with pytest.raises(ValidationError, match="VMs are on this network"):
        commands.delete_network(admin, lab)
    with pytest.raises(ValidationError, match="subnet"):
        commands.update_network(admin, lab, subnet="10.63.0.0/24")
    _settle(commands.destroy(admin, VirtualMachine.objects.get(pk=accepted.vm_id)), "vm.destroyed")
    commands.delete_network(admin, lab)
    assert not Network.objects.filter(name="lab").exists()
    assert VirtualMachine.objects.get(pk=accepted.vm_id).network_id is None


def test_only_admins_change_networks(caller_for) -> None:
    commands.ensure_default_network()
    for role in ("operator", "viewer", "auditor"):
        caller = caller_for(role)
        with pytest.raises(PermissionDenied):
            commands.create_network(
                caller, name="x", subnet="10.64.0.0/24", bridge="xbr0", port_min=2000, port_max=2001
            )
        with pytest.raises(PermissionDenied):
            commands.delete_network(caller, Network.objects.get(is_default=True))


def test_forwards_and_egress_are_the_owners_or_a_managers(caller_for) -> None:
    owner, other, viewer = caller_for("operator"), caller_for("operator"), caller_for("viewer")
    admin = caller_for("admin")
    vm = _running(owner)
    for caller in (other, viewer):
        with pytest.raises(PermissionDenied):
            commands.add_port_forward(caller, vm, protocol="tcp", guest_port=22)
        with pytest.raises(PermissionDenied):
            commands.set_egress(caller, vm, egress="internet")
    forward = commands.add_port_forward(admin, vm, protocol="tcp", guest_port=22)
    vm.refresh_from_db()
    with pytest.raises(PermissionDenied):
        commands.remove_port_forward(other, vm, forward)
    commands.remove_port_forward(owner, vm, forward)


# --- The projection --------------------------------------------------------------------------------


def test_a_rebuild_gives_the_same_networks_vms_and_forwards(caller_for) -> None:
    admin = caller_for("admin")
    commands.ensure_default_network()
    lab = commands.create_network(
        admin, name="lab", subnet="10.65.0.0/24", bridge="labbr2", port_min=23000, port_max=23010
    )
    commands.update_network(admin, lab, is_default=True)
    vm = _running(admin, "r1")
    kept = commands.add_port_forward(admin, vm, protocol="tcp", guest_port=22)
    gone = commands.add_port_forward(admin, vm, protocol="udp", guest_port=53)
    commands.remove_port_forward(admin, vm, gone)
    commands.add_port_forward(admin, vm, protocol="udp", guest_port=54)  # the freed port again
    commands.set_egress(admin, vm, egress="allow-list", allow=["example.org"])
    other = _running(admin, "r2")
    _settle(commands.destroy(admin, other), "vm.destroyed")
    temp = commands.create_network(
        admin, name="tmp", subnet="10.66.0.0/24", bridge="tmpbr0", port_min=24000, port_max=24001
    )
    commands.delete_network(admin, temp)
    assert PortForward.objects.filter(pk=kept.pk).exists()

    def state() -> tuple[list[Any], ...]:
        return (
            list(Network.objects.order_by("pk").values()),
            list(VirtualMachine.objects.order_by("pk").values()),
            list(PortForward.objects.order_by("pk").values()),
        )

    before = state()
    projections.rebuild("vms.state")
    assert state() == before


# --- The API ---------------------------------------------------------------------------------------


def test_the_api_for_forwards_and_egress(make_user, token_client) -> None:
    owner, other, viewer = make_user("operator"), make_user("operator"), make_user("viewer")
    api = token_client(owner)
    created = api.post("/api/v1/vms/", {"name": "web", "template": "linux-small"}, format="json")
    assert created.status_code == 202, created.content
    vm_id = created.json()["vm"]["id"]
    shown = api.get(f"/api/v1/vms/{vm_id}/").json()
    network = Network.objects.get(is_default=True)
    assert (shown["network"], shown["egress"], shown["egress_allow"]) == (
        str(network.pk),
        network.default_egress,
        [],
    )
    ports = f"/api/v1/vms/{vm_id}/ports/"
    added = api.post(ports, {"protocol": "tcp", "guest_port": 22}, format="json")
    assert added.status_code == 201, added.content
    assert added.json()["host_port"] == network.port_min
    assert [f["id"] for f in api.get(ports).json()] == [added.json()["id"]]
    # Bad input: 400 naming the field, nothing changed.
    before = _changes()
    for body in ({"protocol": "sctp", "guest_port": 22}, {"guest_port": 0}, {}):
        response = api.post(ports, body, format="json")
        assert response.status_code == 400, (body, response.content)
    bad = api.put(
        f"/api/v1/vms/{vm_id}/egress/",
        {"egress": "allow-list", "allow": ["not a name"]},
        format="json",
    )
    assert bad.status_code == 400 and "allow" in bad.json()
    assert _changes() == before
    # A viewer sees, but may not add; another operator does not even see it.
    assert token_client(viewer).get(ports).status_code == 200
    refused = token_client(viewer).post(ports, {"guest_port": 80}, format="json")
    assert refused.status_code == 403
    assert token_client(other).post(ports, {"guest_port": 80}, format="json").status_code == 404
    assert token_client(other).get(f"/api/v1/vms/{vm_id}/egress/").status_code == 404
    changed = api.put(
        f"/api/v1/vms/{vm_id}/egress/",
        {"egress": "allow-list", "allow": ["10.0.0.0/8", "example.com"]},
        format="json",
    )
    assert changed.status_code == 200, changed.content
    assert api.get(f"/api/v1/vms/{vm_id}/").json()["egress_allow"] == ["10.0.0.0/8", "example.com"]
    gone = api.delete(f"{ports}{added.json()['id']}/")
    assert gone.status_code == 204 and api.get(ports).json() == []
    assert api.delete(f"{ports}{added.json()['id']}/").status_code == 404


def test_the_api_for_networks(make_user, token_client) -> None:
    admin, operator = make_user("admin"), make_user("operator")
    commands.ensure_default_network()
    body = {"name": "lab", "subnet": "10.70.0.0/24", "bridge": "labbr7"}
    body |= {"port_min": 25000, "port_max": 25100}
    assert token_client(operator).post("/api/v1/networks/", body, format="json").status_code == 403
    assert len(token_client(operator).get("/api/v1/networks/").json()["results"]) == 1
    created = token_client(admin).post("/api/v1/networks/", body, format="json")
    assert created.status_code == 201, created.content
    network_id = created.json()["id"]
    assert created.json()["gateway"] == "10.70.0.1"
    again = token_client(admin).post("/api/v1/networks/", body | {"bridge": "x1"}, format="json")
    assert again.status_code == 400 and "name" in again.json()
    patched = token_client(admin).patch(
        f"/api/v1/networks/{network_id}/", {"isolated": False}, format="json"
    )
    assert patched.status_code == 200 and patched.json()["isolated"] is False
    assert token_client(operator).delete(f"/api/v1/networks/{network_id}/").status_code == 403
    assert token_client(admin).delete(f"/api/v1/networks/{network_id}/").status_code == 204


def test_the_vm_page_shows_its_nic_egress_and_forwards(make_user, caller_for) -> None:
    from django.test import Client

    from accounts.caller import Caller

    owner = make_user("operator")
    caller = Caller.for_user(owner, channel="api")
    vm = _running(caller)
    forward = commands.add_port_forward(caller, vm, protocol="tcp", guest_port=8080)
    vm.refresh_from_db()
    commands.set_egress(caller, vm, egress="allow-list", allow=["example.net"])
    client = Client()
    client.force_login(owner)
    html = client.get(f"/vms/{vm.pk}/").content.decode()
    assert 'id="vm-network"' in html and vm.tap in html and "example.net" in html
    assert f"<code>{forward.host_port}</code>" in html and "<code>8080</code>" in html


def test_a_create_through_the_api_names_its_network(make_user, token_client) -> None:
    admin = make_user("admin")
    commands.ensure_default_network()
    api = token_client(admin)
    body = {"name": "lab", "subnet": "10.71.0.0/24", "bridge": "labbr8"}
    assert (
        api.post("/api/v1/networks/", body | {"port_min": 26000, "port_max": 26001}).status_code
        == 201
    )
    created = api.post(
        "/api/v1/vms/", {"name": "x", "template": "linux-small", "network": "lab"}, format="json"
    )
    assert created.status_code == 202 and created.json()["vm"]["ip"] == "10.71.0.2"
    missing = api.post(
        "/api/v1/vms/", {"name": "y", "template": "linux-small", "network": "nope"}, format="json"
    )
    assert missing.status_code == 400 and "network" in missing.json()
