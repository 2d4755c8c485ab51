"""Every VM endpoint for every role: who may read, who may drive, and who sees nothing.

Operators act on their own VMs only (others' VMs are 404 to them); viewers and auditors read
everything and drive nothing (403); admins do everything; a read-only token may only read; no
credentials is 401. Guest endpoints on a VM with no reachable guest answer 503 to those allowed:
the permission check comes first.
"""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from vms import commands
from vms.models import VirtualMachine

pytestmark = pytest.mark.django_db

ROLES = ["owner", "other", "viewer", "auditor", "admin", "readonly", "anon"]


@pytest.fixture
def world(make_user, issue_token, vm_dirs, kept_image):
    from accounts.caller import Caller

    users = {
        "owner": make_user("operator", "owner"),
        "other": make_user("operator", "other"),
        "viewer": make_user("viewer", "viewer"),
        "auditor": make_user("auditor", "auditor"),
        "admin": make_user("admin", "admin"),
    }
    users["admin"].is_superuser = True
    users["admin"].save()
    caller = Caller.for_user(users["owner"], channel="api")
    accepted = commands.create(caller, name="target", template="linux-small")
    commands.record_outcome(accepted.request, "vm.started", {"host": "h", "hypervisor": "qemu"})
    vm = VirtualMachine.objects.get(pk=accepted.vm.pk)
    snap = commands.snapshot(caller, vm, name="s")
    from audit import store
    from audit.actor import Actor

    commands.record_outcome(snap.request, "vm.snapshotted", {"snapshot_id": str(snap.snapshot.pk)})
    store.append(
        "snapshot",
        str(snap.snapshot.pk),
        "snapshot.created",
        {"manifest": {}, "size_bytes": 0, "image_id": kept_image},
        actor=Actor.system(),
        expected_version=0,
    )
    clients = {}
    for role in ROLES:
        client = APIClient()
        if role == "readonly":
            client.credentials(
                HTTP_AUTHORIZATION=f"Bearer {issue_token(users['owner'], read_only=True)}"
            )
        elif role != "anon":
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {issue_token(users[role])}")
        clients[role] = client
    return {
        "vm": VirtualMachine.objects.get(pk=vm.pk),
        "snap": snap.snapshot,
        "clients": clients,
        "request": accepted.request,
    }


R, W = "read", "write"
# (name, method, path, body, kind, codes for the roles allowed)
ENDPOINTS = [
    ("list vms", "get", "/api/v1/vms/", None, R, 200),
    ("retrieve vm", "get", "/api/v1/vms/{vm}/", None, R, 200),
    ("vm events", "get", "/api/v1/vms/{vm}/events/", None, R, 200),
    ("create vm", "post", "/api/v1/vms/", {"name": "new", "template": "linux-small"}, W, 202),
    ("stop", "post", "/api/v1/vms/{vm}/stop/", {}, W, 202),
    ("reboot", "post", "/api/v1/vms/{vm}/reboot/", {}, W, 202),
    ("pause", "post", "/api/v1/vms/{vm}/pause/", {}, W, 202),
    ("resume", "post", "/api/v1/vms/{vm}/resume/", {}, W, 409),
    ("start", "post", "/api/v1/vms/{vm}/start/", {}, W, 409),
    ("resize", "post", "/api/v1/vms/{vm}/resize/", {"vcpus": 2}, W, 202),
    ("snapshot", "post", "/api/v1/vms/{vm}/snapshot/", {"name": "s2"}, W, 202),
    ("lifetime", "post", "/api/v1/vms/{vm}/lifetime/", {"timeout_s": 600}, W, 200),
    ("fork", "post", "/api/v1/vms/{vm}/fork/", {"count": 2}, W, 202),
    ("idle", "post", "/api/v1/vms/{vm}/idle/", {"idle_timeout_s": 60}, W, 200),
    ("exec", "post", "/api/v1/vms/{vm}/exec/", {"argv": ["true"]}, W, 503),
    ("download", "get", "/api/v1/vms/{vm}/files/?path=/etc/hostname", None, "guest-read", 503),
    ("upload", "put", "/api/v1/vms/{vm}/files/?path=/tmp/x", b"data", W, 503),
    ("destroy vm", "delete", "/api/v1/vms/{vm}/", None, W, 202),
    ("list snapshots", "get", "/api/v1/snapshots/", None, R, 200),
    ("retrieve snapshot", "get", "/api/v1/snapshots/{snap}/", None, R, 200),
    ("restore snapshot", "post", "/api/v1/snapshots/{snap}/restore/", {}, W, 202),
    ("clone snapshot", "post", "/api/v1/snapshots/{snap}/clone/", {"name": "copy"}, W, 202),
    ("delete snapshot", "delete", "/api/v1/snapshots/{snap}/", None, W, 204),
    ("request status", "get", "/api/v1/requests/{request}/", None, R, 200),
    ("templates", "get", "/api/v1/templates/", None, "any", 200),
    ("quota", "get", "/api/v1/quotas/me/", None, "any", 200),
]


def expected(kind: str, role: str, ok: int, path: str) -> int | tuple[int, ...]:
    if role == "anon":
        return 401
    if kind == "any":
        return ok
    if path == "/api/v1/vms/" or path == "/api/v1/snapshots/":  # lists: everyone reads (filtered)
        if kind == R:
            return 200
        # creating: operators and admins
        return ok if role in ("owner", "other", "admin") else 403
    if role == "other":
        return 404  # another operator's VM does not exist for it
    if kind == R:
        return ok
    if kind == "guest-read":  # a read: a read-only token of the owner may do it
        return ok if role in ("owner", "admin", "readonly") else 403
    # writes
    if role in ("owner", "admin"):
        return ok
    return 403  # viewer, auditor, read-only token


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(
    ("name", "method", "path", "body", "kind", "ok"), ENDPOINTS, ids=[e[0] for e in ENDPOINTS]
)
def test_endpoint_for_role(world, role, name, method, path, body, kind, ok) -> None:
    url = path.format(vm=world["vm"].pk, snap=world["snap"].pk, request=world["request"].event_id)
    client = world["clients"][role]
    if isinstance(body, bytes):
        response = getattr(client, method)(
            url,
            body,
            content_type="application/octet-stream",
            HTTP_CONTENT_DISPOSITION="attachment; filename=x",
        )
    else:
        response = (
            getattr(client, method)(url, body, format="json")
            if body is not None
            else getattr(client, method)(url)
        )
    want = expected(kind, role, ok, path)
    assert response.status_code == want, (
        role,
        name,
        response.status_code,
        getattr(response, "data", None),
    )


def test_operator_lists_only_its_own_vms(world) -> None:
    assert world["clients"]["owner"].get("/api/v1/vms/").json()["count"] == 1
    assert world["clients"]["other"].get("/api/v1/vms/").json()["count"] == 0
    assert world["clients"]["viewer"].get("/api/v1/vms/").json()["count"] == 1


def test_errors_are_clear_and_change_nothing(world) -> None:
    from audit.models import Event

    owner = world["clients"]["owner"]
    before = Event.objects.count()
    bad = owner.post("/api/v1/vms/", {"name": "x y", "template": "linux-small"}, format="json")
    assert bad.status_code == 400 and "name" in bad.json()
    bad = owner.post("/api/v1/vms/", {"name": "ok", "vcpus": 0}, format="json")
    assert bad.status_code == 400 and "vcpus" in bad.json()
    conflict = owner.post(f"/api/v1/vms/{world['vm'].pk}/start/")
    assert conflict.status_code == 409 and conflict.json()["state"] == "running"
    bad = owner.post(f"/api/v1/vms/{world['vm'].pk}/exec/", {"argv": []}, format="json")
    assert bad.status_code == 400
    bad = owner.post(
        f"/api/v1/vms/{world['vm'].pk}/exec/", {"argv": ["x"], "timeout": 99999}, format="json"
    )
    assert bad.status_code == 400 and "timeout" in bad.json()
    assert owner.get("/api/v1/vms/00000000-0000-0000-0000-000000000000/").status_code == 404
    assert owner.get("/api/v1/requests/not-a-uuid/").status_code == 404
    assert Event.objects.count() == before


def test_quota_refusal_names_the_quota(world) -> None:
    from vms.models import Quota

    user = world["vm"].owner
    Quota.objects.create(user=user, max_vms=1)
    response = world["clients"]["owner"].post(
        "/api/v1/vms/", {"name": "second", "template": "linux-small"}, format="json"
    )
    assert response.status_code == 403
    assert response.json()["quota"] == "vms" and response.json()["limit"] == 1
    quota = world["clients"]["owner"].get("/api/v1/quotas/me/").json()
    assert quota["used"]["vms"] == 1 and quota["remaining"]["vms"] == 0
