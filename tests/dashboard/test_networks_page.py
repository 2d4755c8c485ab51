"""The networks page: every signed-in role reads the list; administrators create, change and
delete networks through the commands (events appended, read model changed); bad input is shown
on its field with nothing changed; a refused delete says the command's reason; anyone else's
POST is a 403."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.test import Client

from accounts.caller import Caller
from audit.models import Event
from vms import commands
from vms.models import Network, VirtualMachine

pytestmark = pytest.mark.django_db

ROLES = ("admin", "operator", "viewer", "auditor")
LAB = {
    "name": "lab",
    "subnet": "10.61.0.0/24",
    "bridge": "labbr0",
    "port_min": "21000",
    "port_max": "21999",
    "default_egress": "allow-list",
    "isolated": "on",
}


@pytest.fixture(autouse=True)
def _urls(settings: Any) -> None:
    settings.ROOT_URLCONF = "tests.dashboard.urls"


def client_for(user: Any) -> Client:
    c = Client()
    c.force_login(user)
    return c


def _state() -> tuple[int, list[tuple[Any, ...]]]:
    """The event count and every network row: what "nothing changed" compares."""
    rows = Network.objects.order_by("name").values_list(
        "name",
        "subnet",
        "gateway",
        "bridge",
        "isolated",
        "port_min",
        "port_max",
        "default_egress",
        "is_default",
        "version",
    )
    return Event.objects.count(), list(rows)


def _net_events(after: int) -> list[Event]:
    return list(
        Event.objects.filter(position__gt=after, type__startswith="net.network_").order_by(
            "position"
        )
    )


def _field_errors(html: str, field: str) -> str:
    """The text of the field's block on the form (label, input, help, errors)."""
    found = re.search(
        rf'<div class="field has-error">\s*<label for="id_{field}".*?</div></div>', html, re.S
    )
    return found.group(0) if found else ""


@pytest.fixture
def lab_with_a_vm(make_user: Any) -> tuple[Network, VirtualMachine]:
    admin = Caller.for_user(make_user("admin"), channel="api")
    commands.ensure_default_network()
    lab = commands.create_network(
        admin, name="lab", subnet="10.62.0.0/24", bridge="labbr1", port_min=22000, port_max=22010
    )
    accepted = commands.create(
        admin, name="on-lab", template="linux-small", network="lab", start_now=False
    )
    return lab, VirtualMachine.objects.get(pk=accepted.vm_id)


def test_every_role_sees_the_networks_with_their_settings(make_user, lab_with_a_vm) -> None:
    lab, _vm = lab_with_a_vm
    default = Network.objects.get(is_default=True)
    for role in ROLES:
        page = client_for(make_user(role)).get("/networks/")
        assert page.status_code == 200, role
        html = page.content.decode()
        assert 'id="nav-networks"' in html
        row = re.search(r'<tr data-network="lab">(.*?)</tr>', html, re.S)
        assert row is not None, role
        cells = row.group(1)
        for shown in ("10.62.0.0/24", "10.62.0.1", "labbr1", "isolated", "22000–22010", "none"):
            assert shown in cells, (role, shown)
        assert re.search(r'data-field="vm_count">1<', cells), role
        assert f'data-network="{default.name}"' in html
        admin = role == "admin"
        assert ('id="network-create"' in html) is admin, role
        assert (f"/networks/{lab.pk}/edit/" in html) is admin, role
        assert (f"/networks/{lab.pk}/delete/" in html) is admin, role


def test_an_admin_creates_changes_and_deletes_a_network(make_user) -> None:
    admin = make_user("admin")
    commands.ensure_default_network()
    c = client_for(admin)
    before, _ = _state()
    created = c.post("/networks/", LAB)
    assert created.status_code == 302 and created["Location"] == "/networks/"
    lab = Network.objects.get(name="lab")
    assert (lab.subnet, lab.gateway, lab.bridge) == ("10.61.0.0/24", "10.61.0.1", "labbr0")
    assert (lab.port_min, lab.port_max, lab.isolated) == (21000, 21999, True)
    assert (lab.default_egress, lab.is_default) == ("allow-list", False)
    [made] = _net_events(before)
    assert made.type == "net.network_created" and made.aggregate_id == str(lab.pk)
    assert made.actor_name == admin.username
    assert "Network lab created" in c.get("/networks/").content.decode()

    # Unchecking "isolated" and renaming: only what the form changed goes to the command.
    mark, _ = _state()
    edit = c.get(f"/networks/{lab.pk}/edit/").content.decode()
    assert 'value="10.61.0.0/24"' in edit and 'id="network-edit"' in edit
    changed = dict(LAB, name="lab2", default_egress="internet")
    changed.pop("isolated")
    assert c.post(f"/networks/{lab.pk}/edit/", changed).status_code == 302
    lab.refresh_from_db()
    assert (lab.name, lab.isolated, lab.default_egress) == ("lab2", False, "internet")
    [updated] = _net_events(mark)
    assert updated.type == "net.network_updated"
    assert updated.payload["changes"] == {
        "name": "lab2",
        "isolated": False,
        "default_egress": "internet",
    }

    # Saving the form unchanged appends nothing.
    mark, rows = _state()
    assert c.post(f"/networks/{lab.pk}/edit/", changed, follow=True).status_code == 200
    assert _state() == (mark, rows)

    mark, _ = _state()
    assert c.post(f"/networks/{lab.pk}/delete/").status_code == 302
    assert not Network.objects.filter(pk=lab.pk).exists()
    [deleted] = _net_events(mark)
    assert deleted.type == "net.network_deleted" and deleted.payload["name"] == "lab2"


def test_making_a_network_the_default_moves_the_flag(make_user) -> None:
    c = client_for(make_user("admin"))
    old = commands.ensure_default_network()
    assert c.post("/networks/", dict(LAB, is_default="on")).status_code == 302
    lab = Network.objects.get(name="lab")
    old.refresh_from_db()
    assert lab.is_default and not old.is_default


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        ({"subnet": "8.8.8.0/24"}, "subnet", "private range only"),
        ({"subnet": "10.250.0.0/25"}, "subnet", "overlaps the network"),  # the default's
        ({"subnet": "10.61.0.1/24"}, "subnet", "not an IPv4 network"),
        ({"bridge": "br 0"}, "bridge", "an interface name"),
        ({"port_min": "3000", "port_max": "2000"}, "port_max", "must not be below"),
        ({"port_min": "80"}, "port_min", "greater than or equal to 1024"),
        ({"port_max": "many"}, "port_max", "whole number"),
        ({"default_egress": "all"}, "default_egress", "valid choice"),
        ({"name": "Bad Name"}, "name", "lowercase letters"),
        ({"name": ""}, "name", "required"),
    ],
)
def test_bad_input_is_shown_on_its_field_with_nothing_changed(
    make_user, settings, change, field, says
) -> None:
    settings.SANDBOX_NETWORK_CIDR = "10.250.0.0/24"
    commands.ensure_default_network()
    c = client_for(make_user("admin"))
    before = _state()
    page = c.post("/networks/", dict(LAB, **change))
    assert page.status_code == 200
    html = page.content.decode()
    block = _field_errors(html, field)
    assert says in block, html
    # The error is tied to its input (aria-describedby names the error's id).
    assert f'id="id_{field}_error" role="alert"' in block and "aria-invalid" in block
    assert 'value="labbr0"' in html or field == "bridge"  # what was typed is kept
    assert _state() == before


def test_a_change_the_command_refuses_is_shown_with_nothing_changed(
    make_user, lab_with_a_vm
) -> None:
    lab, _vm = lab_with_a_vm
    default = Network.objects.get(is_default=True)
    c = client_for(make_user("admin"))
    form = {
        "name": lab.name,
        "subnet": lab.subnet,
        "bridge": lab.bridge,
        "port_min": lab.port_min,
        "port_max": lab.port_max,
        "default_egress": lab.default_egress,
        "isolated": "on",
    }
    before = _state()
    moved = c.post(f"/networks/{lab.pk}/edit/", dict(form, subnet="10.63.0.0/24"))
    assert moved.status_code == 200
    assert "VMs are on this network" in _field_errors(moved.content.decode(), "subnet")
    taken = c.post(f"/networks/{lab.pk}/edit/", dict(form, name=default.name))
    assert "exists" in _field_errors(taken.content.decode(), "name")
    default_form = {
        "name": default.name,
        "subnet": default.subnet,
        "bridge": default.bridge,
        "port_min": default.port_min,
        "port_max": default.port_max,
        "default_egress": default.default_egress,
        "isolated": "on",
    }  # is_default left unchecked
    unset = c.post(f"/networks/{default.pk}/edit/", default_form)
    assert "make another network the default" in _field_errors(unset.content.decode(), "is_default")
    assert _state() == before


def test_a_refused_delete_shows_the_commands_reason(make_user, lab_with_a_vm) -> None:
    lab, _vm = lab_with_a_vm
    default = Network.objects.get(is_default=True)
    c = client_for(make_user("admin"))
    before = _state()
    on_lab = c.post(f"/networks/{lab.pk}/delete/", follow=True).content.decode()
    assert "Delete of lab refused: VMs are on this network: destroy them first" in on_lab
    the_default = c.post(f"/networks/{default.pk}/delete/", follow=True).content.decode()
    assert f"Delete of {default.name} refused: the default network stays" in the_default
    assert _state() == before


@pytest.mark.parametrize("role", ["operator", "viewer", "auditor"])
def test_others_get_no_forms_and_their_posts_are_refused(make_user, lab_with_a_vm, role) -> None:
    lab, _vm = lab_with_a_vm
    c = client_for(make_user(role))
    before = _state()
    assert c.post("/networks/", dict(LAB, name="mine", subnet="10.64.0.0/24")).status_code == 403
    assert c.post("/networks/", {"name": "Bad Name"}).status_code == 403  # before any checking
    assert c.post(f"/networks/{lab.pk}/edit/", {"port_min": "x"}).status_code == 403
    assert c.post(f"/networks/{lab.pk}/edit/", dict(LAB, name="renamed")).status_code == 403
    assert c.get(f"/networks/{lab.pk}/edit/").status_code == 403
    assert c.post(f"/networks/{lab.pk}/delete/").status_code == 403
    assert _state() == before


def test_forms_need_the_csrf_token(make_user) -> None:
    admin = make_user("admin")
    commands.ensure_default_network()
    c = Client(enforce_csrf_checks=True)
    c.force_login(admin)
    before = _state()
    assert c.post("/networks/", LAB).status_code == 403
    assert _state() == before
    page = c.get("/networks/").content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert token is not None
    assert c.post("/networks/", dict(LAB, csrfmiddlewaretoken=token.group(1))).status_code == 302
    assert Network.objects.filter(name="lab").exists()


def test_a_signed_out_visitor_is_sent_to_the_login_page() -> None:
    page = Client().get("/networks/")
    assert page.status_code == 302 and "/accounts/login/" in page["Location"]
    assert Client().post("/networks/", LAB).status_code == 302
    assert not Network.objects.filter(name="lab").exists()
