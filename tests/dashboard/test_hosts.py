"""The hosts' pages: for readers of all VMs only, what each host holds, a host's VMs and the
summed usage history of the VMs it ran."""

from __future__ import annotations

import pytest
from django.test import Client

from accounts.caller import Caller
from vms import commands

pytestmark = pytest.mark.django_db


def _started_on(vm, host: str) -> None:
    request = commands.start(Caller.for_user(vm.owner), vm).request
    commands.record_outcome(request, "vm.started", {"host": host, "hypervisor": "qemu"})


def test_hosts_show_what_they_hold_to_readers_of_all_vms_only(make_user, make_vm) -> None:
    opal, admin = make_user("operator", "opal"), make_user("admin", "ada")
    for name in ("one", "two"):
        _started_on(make_vm(opal, name), "hv-a")
    _started_on(make_vm(opal, "three"), "hv-b")
    make_vm(opal, "never-started")
    page = Client()
    page.force_login(admin)
    html = page.get("/vms/hosts/").content.decode()
    assert 'id="nav-hosts"' in html
    row_a = html[html.index('data-host="hv-a"') :].split("</tr>")[0]
    assert "<td>2</td><td>2</td><td>512 MiB</td>" in row_a, row_a  # two live 1-vCPU 256 MiB VMs
    assert 'data-host="hv-b"' in html and 'data-host=""' not in html
    detail = page.get("/vms/hosts/hv-a/").content.decode()
    assert ">one<" in detail and ">two<" in detail and ">three<" not in detail
    assert 'data-usage-url="/api/v1/hosts/hv-a/usage/"' in detail
    assert page.get("/vms/hosts/bad%20name/").status_code == 404
    page.force_login(opal)  # an operator sees its own VMs, not the hosts' sums
    assert page.get("/vms/hosts/").status_code == 403
    assert page.get("/vms/hosts/hv-a/").status_code == 403
    assert 'id="nav-hosts"' not in page.get("/vms/").content.decode()
