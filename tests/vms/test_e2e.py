"""End to end on real QEMU guests, through the HTTP API with a token and a real worker process:
create -> running -> exec -> upload and download -> snapshot -> destroy -> clone the snapshot
into a new VM -> exec shows the file is there -> destroy; the timeline holds every step and the
audit chain verifies."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from tests.vms.conftest import wait_for

pytestmark = [pytest.mark.guest, pytest.mark.django_db(transaction=True)]


def settled(client: APIClient, vm_id: str, *states: str) -> dict:
    def check() -> dict | None:
        vm = client.get(f"/api/v1/vms/{vm_id}/").json()
        return vm if vm["state"] in states and not vm["pending_type"] else None

    return wait_for(check, 240, f"VM {vm_id} to reach {states}", interval=0.3)


def test_vm_lifecycle_through_the_api(make_user, issue_token, worker, vm_dirs) -> None:
    user = make_user("operator", "e2e")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {issue_token(user)}")

    created = client.post(
        "/api/v1/vms/", {"name": "e2e-1", "template": "linux-small"}, format="json"
    )
    assert created.status_code == 202, created.json()
    vm_id = created.json()["vm"]["id"]
    assert client.get(created.json()["status_url"]).json()["state"] in ("pending", "succeeded")
    vm = settled(client, vm_id, "running", "failed")
    assert vm["state"] == "running", vm["last_error"]

    run = client.post(
        f"/api/v1/vms/{vm_id}/exec/",
        {"argv": ["sh", "-c", "hostname; echo oops >&2; exit 3"]},
        format="json",
    )
    assert run.status_code == 200, run.json()
    body = run.json()
    assert (body["stdout"], body["stderr"], body["exit_code"]) == ("e2e-1\n", "oops\n", 3)

    payload = os.urandom(3 * 1024 * 1024)
    digest = hashlib.sha256(payload).hexdigest()
    up = client.put(
        f"/api/v1/vms/{vm_id}/files/?path=/data/payload.bin",
        payload,
        content_type="application/octet-stream",
        HTTP_CONTENT_DISPOSITION="attachment; filename=payload.bin",
    )
    assert up.status_code == 201, up.content
    assert up.json()["sha256"] == digest
    down = client.get(f"/api/v1/vms/{vm_id}/files/?path=/data/payload.bin")
    assert down.status_code == 200
    data = b"".join(down.streaming_content)
    assert hashlib.sha256(data).hexdigest() == digest and down["X-Content-SHA256"] == digest

    snap = client.post(f"/api/v1/vms/{vm_id}/snapshot/", {"name": "with-payload"}, format="json")
    assert snap.status_code == 202, snap.json()
    snapshot_id = snap.json()["snapshot"]["id"]
    settled(client, vm_id, "running")
    snapshot = client.get(f"/api/v1/snapshots/{snapshot_id}/").json()
    assert snapshot["state"] == "ready", snapshot["last_error"]
    assert snapshot["manifest"] and all(
        len(f["sha256"]) == 64 for f in snapshot["manifest"].values()
    )

    assert client.delete(f"/api/v1/vms/{vm_id}/").status_code == 202
    settled(client, vm_id, "destroyed")

    clone = client.post(
        f"/api/v1/snapshots/{snapshot_id}/clone/", {"name": "e2e-clone"}, format="json"
    )
    assert clone.status_code == 202, clone.json()
    clone_id = clone.json()["vm"]["id"]
    cloned = settled(client, clone_id, "running", "failed")
    assert cloned["state"] == "running", cloned["last_error"]
    assert cloned["mac"] != vm["mac"]
    check = client.post(
        f"/api/v1/vms/{clone_id}/exec/",
        {"argv": ["sh", "-c", "hostname; sha256sum /data/payload.bin"]},
        format="json",
    ).json()
    assert check["exit_code"] == 0
    assert check["stdout"].splitlines() == ["e2e-clone", f"{digest}  /data/payload.bin"]

    assert client.delete(f"/api/v1/vms/{clone_id}/").status_code == 202
    settled(client, clone_id, "destroyed")

    timeline = [
        e["type"] for e in client.get(f"/api/v1/vms/{vm_id}/events/?limit=200").json()["results"]
    ]
    for step in (
        "vm.created",
        "vm.start_requested",
        "vm.started",
        "vm.exec_requested",
        "vm.exec_completed",
        "vm.file_upload_requested",
        "vm.file_uploaded",
        "vm.file_download_requested",
        "vm.file_downloaded",
        "vm.snapshot_requested",
        "snapshot.created",
        "vm.snapshotted",
        "vm.destroy_requested",
        "vm.destroyed",
    ):
        assert step in timeline, (step, timeline)
    clone_timeline = [
        e["type"] for e in client.get(f"/api/v1/vms/{clone_id}/events/").json()["results"]
    ]
    # The clone's address lease is its own (net.*) beside the VM's own events.
    assert {"net.ip_leased", "net.ip_released"} <= set(clone_timeline)
    vm_steps = [t for t in clone_timeline if not t.startswith("net.")]
    assert vm_steps[:3] == ["vm.created", "vm.restore_requested", "vm.progress"]
    assert "vm.restored" in vm_steps and vm_steps[-1] == "vm.destroyed"

    out = io.StringIO()
    call_command("verify_audit_chain", stdout=out)
    assert "chain intact" in out.getvalue()
