"""Console websocket input that is JSON but not a message (an array, a number) is answered
with an error frame; the session goes on and later input still reaches the serial line."""

from __future__ import annotations

import asyncio
import json

import pytest
from channels.db import database_sync_to_async

from tests.dashboard.test_consumers import _json_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_stopped")]


@pytest.fixture(autouse=True)
async def console_relay_here(settings):  # noqa: ANN001, ANN201
    from vms import console

    settings.SANDBOX_CONSOLE_RELAY = "web"
    yield
    await console.stop_relay()


@pytest.mark.parametrize("text", ["[1,2]", "5", '"input"', "null", "not json"])
async def test_a_message_that_is_not_an_object_gets_an_error_frame(
    make_user, make_vm, ws_connect, fake_serial, console_dir, text
) -> None:
    owner = await database_sync_to_async(make_user)("operator")
    vm = await database_sync_to_async(make_vm)(owner)
    serial = await fake_serial(vm)
    comm = await ws_connect(f"/ws/vms/{vm.pk}/console/", owner)
    assert (await comm.connect())[0]
    await _json_until(comm, lambda m: m["type"] == "session")
    await serial.wait_connected()
    await _json_until(comm, lambda m: m["type"] == "link" and m["connected"])

    await comm.send_to(text_data=text)
    error = await _json_until(comm, lambda m: m["type"] == "error")
    assert "JSON object" in error["detail"]
    # Still connected: input after it is typed.
    await comm.send_to(text_data=json.dumps({"type": "input", "data": "ok\r"}))
    for _ in range(100):
        if b"ok\r" in serial.received:
            break
        await asyncio.sleep(0.02)
    assert bytes(serial.received) == b"ok\r"
    await comm.disconnect()


async def test_console_input_marks_the_vm_used_for_its_idle_policy(
    make_user, make_vm, ws_connect, fake_serial, console_dir
) -> None:
    from vms.models import VMActivity

    owner = await database_sync_to_async(make_user)("operator")
    vm = await database_sync_to_async(make_vm)(owner)
    serial = await fake_serial(vm)
    comm = await ws_connect(f"/ws/vms/{vm.pk}/console/", owner)
    assert (await comm.connect())[0]
    await _json_until(comm, lambda m: m["type"] == "session")
    await serial.wait_connected()
    await _json_until(comm, lambda m: m["type"] == "link" and m["connected"])
    used = database_sync_to_async(lambda: VMActivity.objects.filter(vm_id=vm.pk).exists())
    assert not await used()
    await comm.send_to(text_data=json.dumps({"type": "input", "data": "ls\r"}))
    for _ in range(100):
        if b"ls\r" in serial.received:
            break
        await asyncio.sleep(0.02)
    assert await used()
    await comm.disconnect()
