"""The live VM page's websocket reads the trail once per connection (its catch-up), and the
events pushed afterwards add no read events (review of issue 11, F4)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.db import database_sync_to_async

from tests.dashboard.conftest import live_stopped, make_vm, short_run_dir, ws_connect  # noqa: F401

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_stopped")]


def _reads() -> list[dict[str, Any]]:
    from audit.models import Event

    return [e.payload for e in Event.objects.filter(type="audit.trail_read").order_by("position")]


async def _json_until(comm: Any, predicate: Any, timeout: float = 5.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            message = await comm.receive_json_from(timeout)
            if predicate(message):
                return message


async def test_the_live_timeline_records_its_catch_up_once_and_nothing_per_push(
    make_user,
    make_vm,  # noqa: F811 (the dashboard's fixtures, imported above)
    ws_connect,  # noqa: F811
    short_run_dir,  # noqa: F811
) -> None:
    owner = await database_sync_to_async(make_user)("operator")
    vm = await database_sync_to_async(make_vm)(owner, "watched")
    before = len(await database_sync_to_async(_reads)())
    detail = await ws_connect(f"/ws/vms/{vm.pk}/live/?after=0", owner)
    assert (await detail.connect())[0]
    created = await _json_until(detail, lambda m: m["type"] == "event")
    reads = (await database_sync_to_async(_reads)())[before:]
    assert len(reads) == 1
    assert reads[0]["what"] == "live.vm_timeline"
    assert reads[0]["filters"] == {"vm": str(vm.pk), "after": "0"}
    assert reads[0]["returned"] >= 1 and reads[0]["first_position"] == created["event"]["position"]

    from accounts.caller import Caller
    from vms import commands

    def start() -> None:
        commands.start(Caller.for_user(owner, channel="api"), vm)

    await database_sync_to_async(start)()
    await _json_until(
        detail, lambda m: m["type"] == "event" and m["event"]["type"] == "vm.start_requested"
    )
    assert len((await database_sync_to_async(_reads)())[before:]) == 1
    await detail.disconnect()
