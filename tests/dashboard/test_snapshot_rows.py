"""A VM's snapshot rows alone (``/vms/<id>/snapshots/``, JSON), which its page fetches again
when a snapshot event arrives: the same rows as the page's first render, for those who see the
VM."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.test import Client

from accounts.caller import Caller
from vms import commands

pytestmark = pytest.mark.django_db


def unmasked(html: str) -> str:
    return re.sub(r'name="csrfmiddlewaretoken" value="[^"]*"', "", html)


def client_for(user: Any) -> Client:
    c = Client()
    c.force_login(user)
    return c


def test_the_rows_follow_a_snapshot_from_creating_to_ready(make_user, make_vm) -> None:
    alice = make_user("operator")
    vm = make_vm(alice, "box")
    caller = Caller.for_user(alice, channel="api")
    started = commands.start(caller, vm)
    commands.record_outcome(started.request, "vm.started", {"host": "h", "hypervisor": "qemu"})
    vm.refresh_from_db()
    taken = commands.snapshot(caller, vm, name="snap-1")
    c = client_for(alice)
    rows = c.get(f"/vms/{vm.pk}/snapshots/")
    assert rows.status_code == 200 and rows["Content-Type"] == "application/json"
    assert rows.json()["count"] == 1
    html = rows.json()["rows"]
    assert "snap-1" in html and "creating" in html and "<html" not in html
    snapshot_id = taken.request.data["snapshot_id"]
    commands.record_snapshot_created(
        taken.request,
        snapshot_id,
        {"vm_id": str(vm.pk), "manifest": {}, "size_bytes": 3 * 1024 * 1024, "files": 0},
    )
    html = c.get(f"/vms/{vm.pk}/snapshots/").json()["rows"]
    assert "ready" in html and "3.0\xa0MB" in html and 'data-verb="restore"' in html
    page = c.get(f"/vms/{vm.pk}/").content.decode()
    # The page's first render has the very same rows (but for each form's masked CSRF token).
    assert unmasked(html).strip() in unmasked(page)


def test_others_get_a_404_and_a_viewer_rows_without_actions(make_user, make_vm) -> None:
    vm = make_vm(make_user("operator"), "box")
    assert client_for(make_user("operator")).get(f"/vms/{vm.pk}/snapshots/").status_code == 404
    viewer = client_for(make_user("viewer")).get(f"/vms/{vm.pk}/snapshots/")
    assert viewer.status_code == 200 and "No snapshots." in viewer.json()["rows"]
