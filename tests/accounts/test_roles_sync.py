"""Role groups follow ``accounts.roles.ROLE_PERMISSIONS``: synced after migrate, and a sync
reaches the per-process permission cache at once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.core.management.sql import emit_post_migrate_signal

from accounts import roles
from accounts.permission_cache import clear_permission_cache, perms_of_group

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _forget_cached_permissions() -> Iterator[None]:
    """The cache outlives the test's transaction: drop what it learnt from rolled-back rows."""
    yield
    clear_permission_cache()


def test_a_sync_reaches_the_cached_permissions_and_the_users(
    make_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    viewer = Group.objects.get(name=roles.VIEWER)
    assert perms_of_group(viewer.pk) == frozenset(roles.VM_VIEW)  # now cached
    user = make_user(roles.VIEWER)
    assert user.role == roles.VIEWER

    monkeypatch.setitem(roles.ROLE_PERMISSIONS, roles.VIEWER, ["vms.view_snapshot"])
    roles.sync_roles()

    assert perms_of_group(viewer.pk) == frozenset({"vms.view_snapshot"})
    fresh = type(user).objects.get(pk=user.pk)
    assert fresh.has_perm("vms.view_snapshot")
    assert not fresh.has_perm("vms.view_virtualmachine")


def test_roles_are_synced_after_migrate() -> None:
    viewer = Group.objects.get(name=roles.VIEWER)
    viewer.permissions.clear()
    emit_post_migrate_signal(0, False, "default")
    synced = {f"{p.content_type.app_label}.{p.codename}" for p in viewer.permissions.all()}
    assert synced == set(roles.VM_VIEW)
