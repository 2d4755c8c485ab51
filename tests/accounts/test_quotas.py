"""Quotas inherit per resource: an empty field means "inherit", never "no limit"."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group
from rest_framework.test import APIClient

from accounts.caller import Caller
from vms import commands, quotas
from vms.models import Quota
from vms.quotas import QuotaExceeded

pytestmark = pytest.mark.django_db

DEFAULTS = {"vms": 10, "vcpus": 4, "memory_mib": 4096, "disk_mib": 20480, "snapshots": 5}


@pytest.fixture(autouse=True)
def _defaults(settings) -> None:
    settings.SANDBOX_DEFAULT_QUOTA = dict(DEFAULTS)


def test_a_user_quota_setting_only_max_vms_keeps_the_default_limits(make_user) -> None:
    user = make_user("operator")
    Quota.objects.create(user=user, max_vms=3)
    quota = quotas.effective_quota(user)
    assert quota.as_dict() == DEFAULTS | {
        "vms": 3,
        "source": "user",
        "sources": {r: "user" if r == "vms" else "default" for r in quotas.RESOURCES},
    }
    # And the inherited limit is enforced, not only shown.
    caller = Caller.for_user(user, channel="api")
    commands.create(caller, name="first", template="linux-small", vcpus=3)
    with pytest.raises(QuotaExceeded) as refused:
        commands.create(caller, name="second", template="linux-small", vcpus=2)
    assert (refused.value.quota, refused.value.limit) == ("vcpus", 4)


def test_a_user_quota_inherits_what_it_leaves_empty_from_its_groups(make_user) -> None:
    user = make_user("operator")
    Quota.objects.create(group=Group.objects.get(name="operator"), max_vcpus=2, max_vms=7)
    Quota.objects.create(user=user, max_vms=3)
    quota = quotas.effective_quota(user)
    assert (quota.vms, quota.vcpus, quota.memory_mib) == (3, 2, DEFAULTS["memory_mib"])
    assert (quota.sources["vms"], quota.sources["vcpus"], quota.sources["memory_mib"]) == (
        "user",
        "group",
        "default",
    )
    with pytest.raises(QuotaExceeded, match="vcpus"):
        quotas.check(user, vcpus=3)


def test_a_group_quota_with_empty_fields_does_not_lift_the_defaults(make_user) -> None:
    user = make_user("operator")
    Quota.objects.create(group=Group.objects.get(name="operator"), max_vms=1)
    quota = quotas.effective_quota(user)
    assert quota.snapshots == DEFAULTS["snapshots"] and quota.sources["snapshots"] == "default"
    with pytest.raises(QuotaExceeded, match="snapshots"):
        quotas.check(user, snapshots=DEFAULTS["snapshots"] + 1)


def test_of_several_groups_the_most_generous_that_sets_a_resource_wins(make_user) -> None:
    user = make_user("operator")
    extra = Group.objects.create(name="big-spenders")
    user.groups.add(extra)
    Quota.objects.create(group=Group.objects.get(name="operator"), max_vcpus=2, max_vms=5)
    Quota.objects.create(group=extra, max_vcpus=6)
    quota = quotas.effective_quota(user)
    assert (quota.vcpus, quota.vms, quota.disk_mib) == (6, 5, DEFAULTS["disk_mib"])


def test_quotas_me_shows_the_inherited_limits_and_their_sources(make_user) -> None:
    user = make_user("operator")
    Quota.objects.create(user=user, max_vms=3)
    client = APIClient()
    client.force_authenticate(user)
    body = client.get("/api/v1/quotas/me/").json()
    assert body["quota"]["vms"] == 3 and body["quota"]["vcpus"] == DEFAULTS["vcpus"]
    assert body["quota"]["sources"]["vcpus"] == "default"
    assert body["remaining"]["memory_mib"] == DEFAULTS["memory_mib"]
