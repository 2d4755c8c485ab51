"""Quota changes are events: a user's quota, a group's quota per member and a group's team
budget, changed through the admin API (or the command behind it), each a ``quota.changed`` with
the limits before and after and who changed them; what each user sees of its limits."""

from __future__ import annotations

import pytest
from django.contrib import admin
from django.contrib.auth.models import Group
from django.core.exceptions import PermissionDenied
from rest_framework.test import APIClient

from accounts.caller import Caller
from audit.models import Event
from vms import commands
from vms.models import GroupBudget, Quota

pytestmark = pytest.mark.django_db

EMPTY = {"vms": None, "vcpus": None, "memory_mib": None, "disk_mib": None, "snapshots": None}
DEFAULTS = {"vms": 10, "vcpus": 4, "memory_mib": 4096, "disk_mib": 20480, "snapshots": 5}


@pytest.fixture(autouse=True)
def _defaults(settings) -> None:
    settings.SANDBOX_DEFAULT_QUOTA = dict(DEFAULTS)


def _client(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def _quota_events() -> list[Event]:
    return list(Event.objects.filter(type="quota.changed").order_by("position"))


def test_an_admin_sets_a_users_quota_and_the_change_is_an_event_with_before_and_after(
    make_user,
) -> None:
    admin_user, alice = make_user("admin"), make_user("operator")
    client = _client(admin_user)
    first = client.put(f"/api/v1/quotas/users/{alice.pk}/", {"vms": 3}, format="json")
    assert first.status_code == 200, first.content
    assert first.json()["limits"] == EMPTY | {"vms": 3}
    assert first.json()["effective"]["vms"] == 3
    assert first.json()["effective"]["sources"]["vms"] == "user"
    second = client.put(f"/api/v1/quotas/users/{alice.pk}/", {"vms": 5, "vcpus": 2}, format="json")
    assert second.status_code == 200
    assert Quota.objects.filter(user=alice).values("max_vms", "max_vcpus").get() == {
        "max_vms": 5,
        "max_vcpus": 2,
    }
    created, changed = _quota_events()
    assert (created.aggregate_type, created.aggregate_id) == ("quota", f"user:{alice.pk}")
    assert created.payload == {
        "scope": "user",
        "user_id": alice.pk,
        "username": alice.username,
        "before": EMPTY,
        "after": EMPTY | {"vms": 3},
    }
    assert changed.payload["before"] == EMPTY | {"vms": 3}
    assert changed.payload["after"] == EMPTY | {"vms": 5, "vcpus": 2}
    assert (changed.actor_type, changed.actor_name) == ("user", admin_user.username)
    assert changed.version == 2


def test_the_same_limits_again_change_nothing_and_record_nothing(make_user) -> None:
    admin_user, alice = make_user("admin"), make_user("operator")
    client = _client(admin_user)
    client.put(f"/api/v1/quotas/users/{alice.pk}/", {"vms": 3}, format="json")
    again = client.put(f"/api/v1/quotas/users/{alice.pk}/", {"vms": 3}, format="json")
    assert again.status_code == 200
    assert len(_quota_events()) == 1


def test_emptying_every_limit_removes_the_quota_and_says_so(make_user) -> None:
    admin_user, alice = make_user("admin"), make_user("operator")
    client = _client(admin_user)
    client.put(f"/api/v1/quotas/users/{alice.pk}/", {"vms": 3}, format="json")
    cleared = client.put(f"/api/v1/quotas/users/{alice.pk}/", {}, format="json")
    assert cleared.status_code == 200 and cleared.json()["limits"] == EMPTY
    assert not Quota.objects.filter(user=alice).exists()
    assert _quota_events()[-1].payload["after"] == EMPTY


def test_a_group_quota_and_a_team_budget_are_separate_levels_and_separate_events(
    make_user,
) -> None:
    admin_user = make_user("admin")
    group = Group.objects.create(name="team-a")
    client = _client(admin_user)
    per_member = client.put(f"/api/v1/quotas/groups/{group.pk}/", {"vcpus": 2}, format="json")
    budget = client.put(
        f"/api/v1/quotas/groups/{group.pk}/budget/", {"vcpus": 8, "vms": 4}, format="json"
    )
    assert per_member.status_code == 200 and budget.status_code == 200, budget.content
    assert budget.json() == {
        "scope": "budget",
        "group": "team-a",
        "limits": EMPTY | {"vcpus": 8, "vms": 4},
        "used": {r: 0 for r in EMPTY},
        "remaining": EMPTY | {"vcpus": 8, "vms": 4},
    }
    assert Quota.objects.get(group=group).max_vcpus == 2
    assert GroupBudget.objects.get(group=group).max_vcpus == 8
    member, team = _quota_events()
    assert (member.aggregate_id, member.payload["scope"]) == (f"group:{group.pk}", "group")
    assert (team.aggregate_id, team.payload["scope"]) == (f"budget:{group.pk}", "budget")
    assert team.payload["group"] == "team-a" and team.payload["after"]["vms"] == 4
    got = client.get(f"/api/v1/quotas/groups/{group.pk}/budget/")
    assert got.status_code == 200 and got.json()["limits"]["vcpus"] == 8


def test_only_holders_of_change_quota_may_change_a_quota_and_a_refusal_records_nothing(
    make_user,
) -> None:
    operator, alice = make_user("operator"), make_user("operator")
    client = _client(operator)
    refused = client.put(f"/api/v1/quotas/users/{alice.pk}/", {"vms": 99}, format="json")
    assert refused.status_code == 403
    assert client.get(f"/api/v1/quotas/users/{alice.pk}/").status_code == 403
    with pytest.raises(PermissionDenied):
        commands.set_quota(Caller.for_user(operator), user=alice, limits={"vms": 99})
    assert _quota_events() == [] and not Quota.objects.exists()


@pytest.mark.parametrize(
    "body",
    [{"vms": -1}, {"vms": "many"}, {"vms": 2**31}, {"cpus": 2}, {"vms": True}],
    ids=["negative", "text", "too-large", "unknown", "boolean"],
)
def test_bad_limits_are_refused_with_field_errors_and_change_nothing(make_user, body) -> None:
    admin_user, alice = make_user("admin"), make_user("operator")
    answer = _client(admin_user).put(f"/api/v1/quotas/users/{alice.pk}/", body, format="json")
    assert answer.status_code == 400, answer.content
    assert set(answer.json()) & set(body), answer.json()
    assert _quota_events() == [] and not Quota.objects.exists()


def test_the_command_refuses_what_the_api_would(make_user) -> None:
    from django.core.exceptions import ValidationError

    admin_caller = Caller.for_user(make_user("admin"))
    alice = make_user("operator")
    for bad in ({"vms": -1}, {"vms": True}, {"vms": 1.5}, {"nope": 1}):
        with pytest.raises(ValidationError):
            commands.set_quota(admin_caller, user=alice, limits=bad)
    assert _quota_events() == []


def test_an_unknown_user_or_group_is_404(make_user) -> None:
    client = _client(make_user("admin"))
    assert client.put("/api/v1/quotas/users/999999/", {}, format="json").status_code == 404
    assert client.put("/api/v1/quotas/groups/999999/budget/", {}, format="json").status_code == 404


def test_quotas_and_budgets_have_no_way_around_the_log_in_the_django_admin() -> None:
    # Not registered: the admin site cannot change them without a quota.changed event.
    assert not admin.site.is_registered(Quota)
    assert not admin.site.is_registered(GroupBudget)


def test_quotas_me_shows_each_limit_who_set_it_and_the_budget_that_binds(make_user) -> None:
    admin_caller = Caller.for_user(make_user("admin"))
    alice = make_user("operator")
    group = Group.objects.create(name="team-a")
    alice.groups.add(group)
    commands.set_quota(admin_caller, user=alice, limits={"vms": 6})
    commands.set_quota(admin_caller, group=group, limits={"vcpus": 3})
    commands.set_group_budget(admin_caller, group, {"vms": 2, "memory_mib": 100_000})
    commands.create(Caller.for_user(alice), name="a1", template="linux-small")
    body = _client(alice).get("/api/v1/quotas/me/").json()
    assert body["quota"]["sources"] == {
        "vms": "user",
        "vcpus": "group",
        "memory_mib": "default",
        "disk_mib": "default",
        "snapshots": "default",
    }
    assert body["budget"] == "team-a"
    (budget,) = body["budgets"]
    assert budget["group"] == "team-a" and budget["used"]["vms"] == 1
    assert budget["remaining"] == EMPTY | {"vms": 1, "memory_mib": 100_000 - 256}
    # One VM left in the team's budget (of the user's 6): the budget binds.
    assert (body["remaining"]["vms"], body["limited_by"]["vms"]) == (1, "budget")
    # The team allows more memory than the default allows the user: the default binds.
    assert (body["remaining"]["memory_mib"], body["limited_by"]["memory_mib"]) == (
        DEFAULTS["memory_mib"] - 256,
        "default",
    )
    assert (body["remaining"]["vcpus"], body["limited_by"]["vcpus"]) == (2, "group")


def test_quotas_me_names_no_default_budget_when_the_user_must_choose(make_user) -> None:
    admin_caller = Caller.for_user(make_user("admin"))
    alice = make_user("operator")
    for name in ("team-a", "team-b"):
        group = Group.objects.create(name=name)
        alice.groups.add(group)
        commands.set_group_budget(admin_caller, group, {"vms": 1})
    body = _client(alice).get("/api/v1/quotas/me/").json()
    assert body["budget"] is None
    assert [b["group"] for b in body["budgets"]] == ["team-a", "team-b"]
    assert body["limited_by"]["vms"] == "default"
