"""One VM, one representation: the API's retrieve, its list row (the compiled page and the
filtered ORM page), the VM page's first render and the live messages (the list socket's first
snapshot, the follower's pushes to the list and to the VM's page) show the same fields with the
same values (``vms.representation``)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.test import Client

from vms.representation import (
    SNAPSHOT_BRIEF_FIELDS,
    SNAPSHOT_FIELDS,
    VM_FIELDS,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_stopped")]


async def _json_until(comm: Any, predicate: Any, timeout: float = 5.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        assert remaining > 0, "timed out waiting for a message"
        frame = await comm.receive_output(remaining)
        if frame["type"] == "websocket.send" and frame.get("text"):
            message = json.loads(frame["text"])
            if predicate(message):
                return message


def _a_vm_with_every_kind_of_field_set(owner: Any) -> str:
    """A running VM with an address, a host, a last snapshot: no field left at its default."""
    from accounts.caller import Caller
    from vms import commands
    from vms.models import VirtualMachine

    caller = Caller.for_user(owner, channel="api")
    created = commands.create(caller, name="shown", template="linux-small")
    commands.record_outcome(created.request, "vm.started", {"host": "h1", "hypervisor": "qemu"})
    vm = VirtualMachine.objects.get(pk=created.vm_id)
    snap = commands.snapshot(caller, vm, name="s1")
    commands.record_outcome(snap.request, "vm.snapshotted", {"snapshot_id": str(snap.snapshot.pk)})
    vm = VirtualMachine.objects.get(pk=created.vm_id)
    assert vm.ip and vm.host and vm.last_snapshot_id and vm.state == "running"
    return str(vm.pk)


def _api_views(client: Any, vm_id: str) -> list[dict[str, Any]]:
    """The VM from the retrieve, the compiled list page, and a filtered (ORM) list page."""
    retrieve = client.get(f"/api/v1/vms/{vm_id}/").json()
    page = client.get("/api/v1/vms/").json()["results"]
    filtered = client.get("/api/v1/vms/?name=shown").json()["results"]
    rows = [vm for vm in page + filtered if vm["id"] == vm_id]
    assert len(rows) == 2
    return [retrieve, *rows]


def _detail_page_vm(owner: Any, vm_id: str) -> dict[str, Any]:
    client = Client()
    client.force_login(owner)
    html = client.get(f"/vms/{vm_id}/").content.decode()
    found = re.search(r'<script id="vm-data" type="application/json">(.*?)</script>', html)
    assert found, "the VM page embeds its VM"
    return json.loads(found.group(1))


async def test_the_api_and_the_live_pages_show_a_vm_alike(
    make_user, token_client, ws_connect
) -> None:
    owner = await database_sync_to_async(make_user)("operator")
    vm_id = await database_sync_to_async(_a_vm_with_every_kind_of_field_set)(owner)
    client = await database_sync_to_async(token_client)(owner)

    listing = await ws_connect("/ws/vms/live/", owner)
    page = await ws_connect(f"/ws/vms/{vm_id}/live/?after=0", owner)
    for comm in (listing, page):
        assert (await comm.connect())[0]
    first = await _json_until(listing, lambda m: m["type"] == "vm")
    joined = await _json_until(page, lambda m: m["type"] == "vm")
    apis = await database_sync_to_async(_api_views)(client, vm_id)
    rendered = await database_sync_to_async(_detail_page_vm)(owner, vm_id)
    for shown in (*apis, rendered, first["vm"], joined["vm"]):
        assert list(shown) == VM_FIELDS
        assert shown == apis[0]

    # A change: the follower pushes the VM as the API now shows it, to the list and the page.
    def stop() -> None:
        from accounts.caller import Caller
        from vms import commands
        from vms.models import VirtualMachine

        commands.stop(Caller.for_user(owner, channel="api"), VirtualMachine.objects.get(pk=vm_id))

    await database_sync_to_async(stop)()
    pushed = await _json_until(
        listing, lambda m: m["type"] == "vm" and m["vm"]["state"] == "stopping"
    )
    event = await _json_until(
        page, lambda m: m["type"] == "event" and m["event"]["type"] == "vm.stop_requested"
    )
    apis = await database_sync_to_async(_api_views)(client, vm_id)
    assert apis[0]["state"] == "stopping" and apis[0]["pending_type"] == "vm.stop_requested"
    for shown in (*apis, pushed["vm"], event["vm"]):
        assert shown == apis[0]
    for comm in (listing, page):
        await comm.disconnect()


def test_the_schema_declares_the_fields_the_representation_computes() -> None:
    from vms.api import SnapshotBriefSerializer, SnapshotSerializer, VMSerializer

    assert list(VMSerializer().fields) == VM_FIELDS
    assert list(SnapshotSerializer().fields) == SNAPSHOT_FIELDS
    # The brief form (nested in an action's answer) is the full one, shortened.
    assert list(SnapshotBriefSerializer().fields) == SNAPSHOT_BRIEF_FIELDS
    assert set(SNAPSHOT_BRIEF_FIELDS) <= set(SNAPSHOT_FIELDS)
