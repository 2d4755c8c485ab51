"""Console sessions fail closed: a session is in the log (``vm.console_opened``, committed)
before the websocket is accepted, so no keystroke reaches the guest from an unrecorded session;
when the log cannot take it, the console is refused (4503) and the serial line sees nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.db import database_sync_to_async

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_stopped")]


@pytest.fixture(autouse=True)
async def console_relay_here(settings: Any) -> Any:
    from vms import console

    settings.SANDBOX_CONSOLE_RELAY = "web"
    yield
    await console.stop_relay()


async def test_a_console_the_log_cannot_record_is_refused_and_types_nothing(
    make_user, make_vm, ws_connect, fake_serial, console_dir, monkeypatch
) -> None:
    from audit.errors import EventStoreUnavailable
    from vms import commands

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise EventStoreUnavailable("event store unavailable: test")

    monkeypatch.setattr(commands, "record_console_opened", refuse)
    owner = await database_sync_to_async(make_user)("operator")
    vm = await database_sync_to_async(make_vm)(owner)
    serial = await fake_serial(vm)
    comm = await ws_connect(f"/ws/vms/{vm.pk}/console/", owner)
    connected, code = await comm.connect()
    assert (connected, code) == (False, 4503)
    await comm.disconnect()
    await asyncio.sleep(0.2)
    assert bytes(serial.received) == b""


async def test_a_typing_session_is_committed_to_the_log_before_it_is_accepted(
    make_user, make_vm, ws_connect, fake_serial, console_dir, monkeypatch
) -> None:
    from django.db import connection

    from audit.models import Event
    from vms import commands

    seen: list[tuple[bool, int]] = []
    record = commands.record_console_opened

    def spy(*args: Any, **kwargs: Any) -> Any:
        event = record(*args, **kwargs)
        # After the command returned: committed (no transaction left open), and in the log.
        seen.append(
            (connection.in_atomic_block, Event.objects.filter(position=event.position).count())
        )
        return event

    monkeypatch.setattr(commands, "record_console_opened", spy)
    owner = await database_sync_to_async(make_user)("operator")
    vm = await database_sync_to_async(make_vm)(owner)
    await fake_serial(vm)
    comm = await ws_connect(f"/ws/vms/{vm.pk}/console/", owner)
    assert (await comm.connect())[0]
    await comm.disconnect()
    assert seen == [(False, 1)]
