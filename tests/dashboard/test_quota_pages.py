"""The create page shows each limit, who set it, and the team budgets the user's VMs draw from;
a user in several budgeted groups chooses one there (docs/quotas.md)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.test import Client

from accounts.caller import Caller
from vms import commands
from vms.models import VirtualMachine

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _urls(settings: Any) -> None:
    settings.ROOT_URLCONF = "tests.dashboard.urls"
    settings.SANDBOX_DEFAULT_QUOTA = {
        "vms": 10,
        "vcpus": 4,
        "memory_mib": 4096,
        "disk_mib": 20480,
        "snapshots": 5,
    }


def client_for(user: Any) -> Client:
    c = Client()
    c.force_login(user)
    return c


def _row(html: str, resource: str, table: str = 'id="quota-table"') -> str:
    section = html[html.index(table) :]
    return re.search(rf'<tr data-resource="{resource}"[^>]*>.*?</tr>', section, re.S).group(0)


def _budget(admin: Any, name: str, *members: Any, **limits: int) -> Group:
    group = Group.objects.create(name=name)
    for m in members:
        m.groups.add(group)
    commands.set_group_budget(Caller.for_user(admin), group, limits)
    return group


def test_the_create_page_shows_who_set_each_limit_and_the_team_budget(make_user) -> None:
    admin, alice, bob = make_user("admin"), make_user("operator"), make_user("operator")
    commands.set_quota(Caller.for_user(admin), user=alice, limits={"vms": 6})
    _budget(admin, "team-a", alice, bob, vms=2)
    commands.create(Caller.for_user(bob), name="b1", template="linux-small")
    page = client_for(alice).get("/vms/new/").content.decode()
    vms_row = _row(page, "vms")
    assert "your quota" in vms_row and 'data-limited-by="budget"' in vms_row
    assert "team budget team-a" in vms_row and "<b>1</b>" in vms_row
    assert "the default" in _row(page, "vcpus")
    team_row = _row(page, "vms", 'data-group="team-a"')
    assert re.findall(r"<td>(.*?)</td>", team_row)[:3] == ["vms", "1", "2"]
    assert "(your VMs draw from it)" in page
    # One budget: the form names it and the VM is charged to it.
    created = client_for(alice).post(
        "/vms/new/", {"name": "a1", "template": "linux-small", "budget": "team-a"}
    )
    assert created.status_code == 302
    refused = client_for(alice).post(
        "/vms/new/", {"name": "a2", "template": "linux-small", "budget": "team-a"}
    )
    assert "Over quota" in refused.content.decode() and "team-a" in refused.content.decode()
    assert not VirtualMachine.objects.filter(name="a2").exists()


def test_a_user_in_several_budgets_must_choose_one_on_the_create_page(make_user) -> None:
    admin, alice = make_user("admin"), make_user("operator")
    _budget(admin, "team-a", alice, vms=3)
    second = _budget(admin, "team-b", alice, vms=3)
    c = client_for(alice)
    page = c.get("/vms/new/").content.decode()
    assert 'name="budget"' in page and "choose the one a new VM draws from" in page
    unchosen = c.post("/vms/new/", {"name": "x", "template": "linux-small", "start": ""})
    assert unchosen.status_code == 200 and not VirtualMachine.objects.exists()
    chosen = c.post(
        "/vms/new/", {"name": "x", "template": "linux-small", "start": "", "budget": "team-b"}
    )
    assert chosen.status_code == 302
    assert VirtualMachine.objects.get(name="x").budget_group_id == second.pk


def test_without_a_budget_the_create_page_has_no_budget_field(make_user) -> None:
    page = client_for(make_user("operator")).get("/vms/new/").content.decode()
    assert 'name="budget"' not in page and "Team budget of" not in page


def test_an_admin_sets_limits_on_the_quotas_page_and_each_change_is_an_event(make_user) -> None:
    from audit.models import Event
    from vms.models import GroupBudget, Quota

    admin, alice = make_user("admin"), make_user("operator")
    group = Group.objects.create(name="team-a")
    c = client_for(admin)
    assert 'id="nav-quotas"' in c.get("/").content.decode()
    saved = c.post("/vms/quotas/", {"level": "user", "name": alice.username, "vms": "3"})
    assert saved.status_code == 302
    budget = c.post("/vms/quotas/", {"level": "budget", "name": "team-a", "vcpus": "8"})
    assert budget.status_code == 302
    assert Quota.objects.get(user=alice).max_vms == 3
    assert GroupBudget.objects.get(group=group).max_vcpus == 8
    events = list(Event.objects.filter(type="quota.changed").order_by("position"))
    assert [(e.aggregate_id, e.actor_name) for e in events] == [
        (f"user:{alice.pk}", admin.username),
        (f"budget:{group.pk}", admin.username),
    ]
    assert events[0].payload["before"]["vms"] is None and events[0].payload["after"]["vms"] == 3
    page = c.get("/vms/quotas/").content.decode()
    assert f'data-user="{alice.username}"' in page and 'data-budget="team-a"' in page
    assert "0 of 8" in page
    # The edit link fills the form with what is set now.
    edit = c.get(f"/vms/quotas/?level=user&name={alice.username}").content.decode()
    assert re.search(r'name="vms" value="3"', edit)
    # The same again: nothing changes, nothing is recorded.
    c.post("/vms/quotas/", {"level": "user", "name": alice.username, "vms": "3"})
    assert Event.objects.filter(type="quota.changed").count() == 2


def test_the_quotas_page_refuses_bad_input_and_everyone_but_admins(make_user) -> None:
    from audit.models import Event

    admin, operator = make_user("admin"), make_user("operator")
    c = client_for(admin)
    unknown = c.post("/vms/quotas/", {"level": "user", "name": "nobody", "vms": "3"})
    assert unknown.status_code == 200 and "no user named" in unknown.content.decode()
    negative = c.post("/vms/quotas/", {"level": "group", "name": "operator", "vms": "-1"})
    assert negative.status_code == 200 and "has-error" in negative.content.decode()
    other = client_for(operator)
    assert other.get("/vms/quotas/").status_code == 403
    post = other.post("/vms/quotas/", {"level": "user", "name": operator.username, "vms": "99"})
    assert post.status_code == 403
    assert 'id="nav-quotas"' not in other.get("/").content.decode()
    assert not Event.objects.filter(type="quota.changed").exists()
