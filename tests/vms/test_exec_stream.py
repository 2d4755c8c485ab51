"""The exec websocket: who may connect, and output streamed while the command runs."""

from __future__ import annotations

import json
import time

import pytest
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.urls import re_path

from vms.exec_consumer import ExecConsumer

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("close_sync_thread_db"),
]


@pytest.fixture
async def close_sync_thread_db():
    """database_sync_to_async runs in one shared thread whose connection would keep the test
    database in use after the session: close it after each test."""
    yield
    from django.db import connections

    await database_sync_to_async(connections.close_all)()


APP = URLRouter([re_path(r"^ws/vms/(?P<vm_id>[0-9a-f-]+)/exec/$", ExecConsumer.as_asgi())])


def make_vm(caller, *, run: bool) -> object:
    from vms import commands, worker
    from vms.models import VirtualMachine

    accepted = commands.create(caller, name="streamer", template="linux-small")
    if run:
        assert worker.handle(accepted.request.event_id) == "vm.started"
    else:
        commands.record_outcome(accepted.request, "vm.started", {})
    return VirtualMachine.objects.get(pk=accepted.vm.pk)


async def connect(user, vm_id) -> tuple[WebsocketCommunicator, bool, int | None]:
    communicator = WebsocketCommunicator(APP, f"/ws/vms/{vm_id}/exec/")
    communicator.scope["user"] = user
    connected, code = await communicator.connect()
    return communicator, connected, code


async def test_anonymous_and_strangers_are_refused(caller_for) -> None:
    from django.contrib.auth.models import AnonymousUser

    owner = await database_sync_to_async(caller_for)("operator")
    vm = await database_sync_to_async(make_vm)(owner, run=False)
    stranger = await database_sync_to_async(caller_for)("operator")
    for user, want in ((AnonymousUser(), 4401), (stranger.user, 4404)):
        communicator, connected, code = await connect(user, vm.pk)
        assert (connected, code) == (False, want)
        await communicator.disconnect()


async def test_viewer_sees_the_vm_but_may_not_exec(caller_for) -> None:
    owner = await database_sync_to_async(caller_for)("operator")
    vm = await database_sync_to_async(make_vm)(owner, run=False)
    viewer = await database_sync_to_async(caller_for)("viewer")
    communicator, connected, _ = await connect(viewer.user, vm.pk)
    assert connected
    await communicator.send_to(text_data=json.dumps({"argv": ["true"]}))
    frame = json.loads(await communicator.receive_from(timeout=10))
    assert frame["type"] == "error" and frame["status"] == 403
    await communicator.disconnect()


async def test_bad_input_is_an_error_frame(caller_for) -> None:
    owner = await database_sync_to_async(caller_for)("operator")
    vm = await database_sync_to_async(make_vm)(owner, run=False)
    communicator, connected, _ = await connect(owner.user, vm.pk)
    assert connected
    await communicator.send_to(text_data=json.dumps({"argv": []}))
    frame = json.loads(await communicator.receive_from(timeout=10))
    assert frame["type"] == "error" and frame["status"] == 400 and "argv" in frame["detail"]
    await communicator.disconnect()


async def test_deeply_nested_json_is_an_error_frame(caller_for) -> None:
    """A RecursionError in the decoder used to end the connection without an answer."""
    owner = await database_sync_to_async(caller_for)("operator")
    vm = await database_sync_to_async(make_vm)(owner, run=False)
    communicator, connected, _ = await connect(owner.user, vm.pk)
    assert connected
    await communicator.send_to(text_data="[" * 100_000)
    frame = json.loads(await communicator.receive_from(timeout=10))
    assert frame["type"] == "error" and frame["status"] == 400
    await communicator.disconnect()


@pytest.mark.guest
async def test_output_streams_before_the_command_ends(caller_for, vm_dirs) -> None:
    from vms import commands, worker

    owner = await database_sync_to_async(caller_for)("operator")
    vm = await database_sync_to_async(make_vm)(owner, run=True)
    try:
        communicator, connected, _ = await connect(owner.user, vm.pk)
        assert connected
        script = "for i in 1 2 3; do echo tick $i; sleep 0.4; done; echo done >&2"
        await communicator.send_to(
            text_data=json.dumps({"argv": ["sh", "-c", script], "timeout": 30})
        )
        frames, arrivals = [], []
        while True:
            frame = json.loads(await communicator.receive_from(timeout=30))
            frames.append(frame)
            arrivals.append(time.monotonic())
            if frame["type"] in ("exit", "error"):
                break
        await communicator.disconnect()
        assert frames[-1]["type"] == "exit" and frames[-1]["exit_code"] == 0, frames[-1]
        stdout = [f for f in frames if f["type"] == "stdout"]
        assert "".join(f["data"] for f in stdout) == "tick 1\ntick 2\ntick 3\n"
        assert any(f["type"] == "stderr" and f["data"] == "done\n" for f in frames)
        # Streamed: the first tick arrived well before the exit (the command runs ~1.2 s).
        assert arrivals[-1] - arrivals[frames.index(stdout[0])] > 0.6
    finally:
        destroy = await database_sync_to_async(commands.destroy)(owner, vm)
        await database_sync_to_async(worker.handle)(destroy.request.event_id)


@pytest.mark.guest
async def test_the_websocket_streams_all_of_an_output_beyond_the_http_cap(
    caller_for, vm_dirs, settings
) -> None:
    import base64

    from vms import commands, worker

    settings.SANDBOX_EXEC_OUTPUT_LIMIT = 64 << 10
    total = 5_000_000
    owner = await database_sync_to_async(caller_for)("operator")
    vm = await database_sync_to_async(make_vm)(owner, run=True)
    try:
        communicator, connected, _ = await connect(owner.user, vm.pk)
        assert connected
        await communicator.send_to(
            text_data=json.dumps({"argv": ["head", "-c", str(total), "/dev/zero"], "timeout": 120})
        )
        received = 0
        while True:
            frame = json.loads(await communicator.receive_from(timeout=60))
            if frame["type"] == "stdout":
                received += len(base64.b64decode(frame["b64"]))
            elif frame["type"] in ("exit", "error"):
                break
        await communicator.disconnect()
        assert frame["type"] == "exit" and frame["exit_code"] == 0, frame
        assert received == total
        assert (frame["stdout_size"], frame["stderr_size"]) == (total, 0)
    finally:
        destroy = await database_sync_to_async(commands.destroy)(owner, vm)
        await database_sync_to_async(worker.handle)(destroy.request.event_id)
