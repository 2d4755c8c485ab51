"""The websocket consumers through the real ASGI stack (origin check, session auth, routing):
who may connect, who may type, fan-out and scrollback, recordings and their events, and live
updates pushed by the log follower."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from channels.db import database_sync_to_async

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_stopped")]


@pytest.fixture(autouse=True)
async def console_relay_here(settings: Any) -> Any:
    """The console relay in this process (as on the embedded default), on whichever channel
    layer the configuration has; stopped with the test's event loop."""
    from vms import console

    settings.SANDBOX_CONSOLE_RELAY = "web"
    yield
    await console.stop_relay()


async def _json_until(comm: Any, predicate: Any, timeout: float = 5.0) -> dict[str, Any]:
    """Text frames until one satisfies ``predicate`` (binary frames are skipped)."""
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


async def _bytes_until(comm: Any, needle: bytes, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen = b""
    while needle not in seen:
        remaining = deadline - loop.time()
        assert remaining > 0, f"timed out waiting for {needle!r}; got {seen!r}"
        frame = await comm.receive_output(remaining)
        if frame["type"] == "websocket.send" and frame.get("bytes"):
            seen += frame["bytes"]
    return seen


def _console_events(vm: Any) -> list[dict[str, Any]]:
    from audit.models import Event

    return [
        {"type": e.type, "actor": e.actor_name, **e.payload}
        for e in Event.objects.filter(
            aggregate_id=str(vm.pk), type__startswith="vm.console_"
        ).order_by("position")
    ]


async def test_anonymous_is_refused(make_user, make_vm, ws_connect) -> None:
    vm = await database_sync_to_async(make_vm)(await database_sync_to_async(make_user)("operator"))
    for path in (f"/ws/vms/{vm.pk}/console/", f"/ws/vms/{vm.pk}/live/", "/ws/vms/live/"):
        comm = await ws_connect(path)
        connected, code = await comm.connect()
        assert (connected, code) == (False, 4401), path
        await comm.disconnect()


async def test_another_operator_is_refused(make_user, make_vm, ws_connect, console_dir) -> None:
    owner = await database_sync_to_async(make_user)("operator")
    other = await database_sync_to_async(make_user)("operator")
    vm = await database_sync_to_async(make_vm)(owner)
    for path in (f"/ws/vms/{vm.pk}/console/", f"/ws/vms/{vm.pk}/live/"):
        comm = await ws_connect(path, other)
        connected, code = await comm.connect()
        assert (connected, code) == (False, 4403), path
        await comm.disconnect()
    assert await database_sync_to_async(_console_events)(vm) == []  # nothing was opened


async def test_foreign_origin_is_refused(make_user, make_vm, ws_connect) -> None:
    from channels.testing import WebsocketCommunicator

    from sandbox_site.asgi import application

    owner = await database_sync_to_async(make_user)("operator")
    vm = await database_sync_to_async(make_vm)(owner)
    comm = WebsocketCommunicator(
        application, f"/ws/vms/{vm.pk}/console/", headers=[(b"origin", b"http://evil.example")]
    )
    connected, _ = await comm.connect()
    assert not connected
    await comm.disconnect()


async def test_owner_types_viewer_only_watches(
    make_user, make_vm, ws_connect, fake_serial, console_dir
) -> None:
    owner = await database_sync_to_async(make_user)("operator")
    viewer = await database_sync_to_async(make_user)("viewer")
    vm = await database_sync_to_async(make_vm)(owner)
    serial = await fake_serial(vm)

    op = await ws_connect(f"/ws/vms/{vm.pk}/console/?cols=100&rows=30", owner)
    assert (await op.connect())[0]
    hello = await _json_until(op, lambda m: m["type"] == "session")
    assert hello["mode"] == "write"
    await serial.wait_connected()
    await _json_until(op, lambda m: m["type"] == "link" and m["connected"])

    await op.send_to(bytes_data=b"uname -a\r")
    for _ in range(100):
        if b"uname -a\r" in serial.received:
            break
        await asyncio.sleep(0.02)
    assert bytes(serial.received) == b"uname -a\r"
    await serial.output(b"uname -a\r\nLinux guest 6.1.0\r\n# ")
    await _bytes_until(op, b"Linux guest")

    # A viewer joining later gets the scrollback, then live output; its keys go nowhere.
    vw = await ws_connect(f"/ws/vms/{vm.pk}/console/", viewer)
    assert (await vw.connect())[0]
    assert (await _json_until(vw, lambda m: m["type"] == "session"))["mode"] == "read"
    await _bytes_until(vw, b"Linux guest 6.1.0")
    await vw.send_to(bytes_data=b"reboot\r")
    await vw.send_to(text_data=json.dumps({"type": "input", "data": "halt\r"}))
    await serial.output(b"more output\r\n")
    await _bytes_until(vw, b"more output")
    await _bytes_until(op, b"more output")
    await asyncio.sleep(0.2)
    assert bytes(serial.received) == b"uname -a\r", "a viewer's input reached the guest"
    assert serial.connections == 1, "one serial connection per VM per process"

    await vw.disconnect()
    await op.disconnect()

    events = await database_sync_to_async(_console_events)(vm)
    assert [e["type"] for e in events] == [
        "vm.console_opened",
        "vm.console_opened",
        "vm.console_closed",
        "vm.console_closed",
    ]
    opened = {e["session"]: e for e in events if e["type"] == "vm.console_opened"}
    closed = {e["session"]: e for e in events if e["type"] == "vm.console_closed"}
    assert {e["mode"] for e in opened.values()} == {"operator", "viewer"}
    for session, end in closed.items():
        path = Path(console_dir) / end["recording"]
        data = path.read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (end["size"], end["sha256"])
        lines = [json.loads(line) for line in data.decode().splitlines()]
        assert lines[0]["version"] == 2
        kinds = {f[1] for f in lines[1:]}
        if opened[session]["mode"] == "operator":
            assert (lines[0]["width"], lines[0]["height"]) == (100, 30)
            assert [0.0 <= f[0] for f in lines[1:]] and "i" in kinds
            assert "".join(f[2] for f in lines[1:] if f[1] == "i") == "uname -a\r"
            assert end["ignored_input_bytes"] == 0
        else:
            assert kinds == {"o"}, "a viewer's recording holds no input"
            assert end["ignored_input_bytes"] == len(b"reboot\r") + len(b"halt\r")
        assert "Linux guest 6.1.0" in "".join(f[2] for f in lines[1:] if f[1] == "o")


async def test_console_link_down_is_reported(
    make_user, make_vm, ws_connect, short_run_dir, console_dir
) -> None:
    owner = await database_sync_to_async(make_user)("operator")
    vm = await database_sync_to_async(make_vm)(owner)  # never started: no serial socket
    comm = await ws_connect(f"/ws/vms/{vm.pk}/console/", owner)
    assert (await comm.connect())[0]
    status = await _json_until(comm, lambda m: m["type"] == "link" and "reason" in m)
    assert status["connected"] is False
    await comm.send_to(bytes_data=b"x")  # dropped with a status, not an error
    await comm.disconnect()


async def test_console_says_when_the_relay_does_not_answer(
    make_user, make_vm, ws_connect, short_run_dir, console_dir, settings, monkeypatch
) -> None:
    """With the relay in the worker and no worker running, the console says so."""
    from vms import console

    settings.SANDBOX_CONSOLE_RELAY = "worker"  # nobody relays in this process
    monkeypatch.setattr(console, "RELAY_TIMEOUT_S", 0.3)
    owner = await database_sync_to_async(make_user)("operator")
    vm = await database_sync_to_async(make_vm)(owner)
    comm = await ws_connect(f"/ws/vms/{vm.pk}/console/", owner)
    assert (await comm.connect())[0]
    status = await _json_until(comm, lambda m: m["type"] == "link" and "reason" in m)
    assert status["connected"] is False and "relay does not answer" in status["reason"]
    await comm.disconnect()


async def test_the_relay_drops_a_consumer_that_went_silent(
    make_user, make_vm, fake_serial, monkeypatch
) -> None:
    """A web process killed mid-session never detaches: the relay drops its consumers when
    their keep-alives stop, and frees the serial link."""
    from channels.layers import get_channel_layer

    from vms import console

    monkeypatch.setattr(console, "KEEPALIVE_S", 0.1)
    monkeypatch.setattr(console, "SUBSCRIBER_TTL_S", 0.5)
    owner = await database_sync_to_async(make_user)("operator")
    vm = await database_sync_to_async(make_vm)(owner)
    serial = await fake_serial(vm)
    layer = get_channel_layer()
    await console.ensure_relay()
    gone = await layer.new_channel("gone.")
    await layer.send(
        console.relay_channel(), {"type": "console.attach", "vm": str(vm.pk), "reply": gone}
    )
    assert (await layer.receive(gone))["type"] == "console.link"
    assert (await layer.receive(gone))["type"] == "console.attached"
    await serial.wait_connected()
    for _ in range(100):  # no keep-alive from here on
        if not serial.writers:
            break
        await asyncio.sleep(0.05)
    assert not serial.writers, "the serial link is still held for a consumer that is gone"


async def test_live_updates_follow_the_log(make_user, make_vm, ws_connect, short_run_dir) -> None:
    owner = await database_sync_to_async(make_user)("operator")
    other = await database_sync_to_async(make_user)("operator")
    viewer = await database_sync_to_async(make_user)("viewer")
    vm = await database_sync_to_async(make_vm)(owner, "first")

    as_owner = await ws_connect("/ws/vms/live/", owner)
    as_viewer = await ws_connect("/ws/vms/live/", viewer)
    as_other = await ws_connect("/ws/vms/live/", other)
    detail = await ws_connect(f"/ws/vms/{vm.pk}/live/?after=0", owner)
    for comm in (as_owner, as_viewer, as_other, detail):
        assert (await comm.connect())[0]
    first = await _json_until(as_owner, lambda m: m["type"] == "vm")
    assert first["vm"]["name"] == "first"
    # The detail page catches up on the events it had not rendered (after=0: all of them).
    created = await _json_until(detail, lambda m: m["type"] == "event")
    assert created["event"]["type"] == "vm.created"

    # A command appends; the follower (not the command) pushes the committed result.
    from accounts.caller import Caller
    from vms import commands

    def start() -> None:
        commands.start(Caller.for_user(owner, channel="api"), vm)

    await database_sync_to_async(start)()
    update = await _json_until(
        as_owner, lambda m: m["type"] == "vm" and m["vm"]["state"] == "starting"
    )
    assert update["vm"]["pending_type"] == "vm.start_requested"
    seen_by_viewer = await _json_until(
        as_viewer, lambda m: m["type"] == "vm" and m["vm"]["state"] == "starting"
    )
    assert seen_by_viewer["vm"]["id"] == str(vm.pk)
    timeline = await _json_until(
        detail, lambda m: m["type"] == "event" and m["event"]["type"] == "vm.start_requested"
    )
    assert timeline["vm"]["state"] == "starting"
    # The other operator sees none of it.
    assert await as_other.receive_nothing(0.5)
    for comm in (as_owner, as_viewer, as_other, detail):
        await comm.disconnect()
