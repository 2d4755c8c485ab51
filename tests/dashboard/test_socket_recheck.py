"""Open websockets keep checking their caller (``accounts.authentication.recheck_socket``).

Filed: a socket was authorised once, at its handshake: after the token was revoked, the user
demoted or deactivated, a list socket kept receiving other users' VMs, an exec socket took a
new command with the revoked token and a console stayed in write mode."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.utils import timezone

from audit.actor import Actor

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_stopped")]

SHELL = Actor.system(channel="shell", name="tests")


@pytest.fixture(autouse=True)
async def console_relay_here(settings: Any) -> Any:
    from vms import console

    settings.SANDBOX_CONSOLE_RELAY = "web"
    yield
    await console.stop_relay()


def _token_socket(path: str, token: str) -> WebsocketCommunicator:
    from sandbox_site.asgi import application

    headers = [(b"origin", b"http://127.0.0.1"), (b"authorization", f"Bearer {token}".encode())]
    return WebsocketCommunicator(application, path, headers=headers)


async def _closed_with(comm: WebsocketCommunicator, timeout: float = 8.0) -> int:
    """Frames until the server closes the socket; its close code."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        assert remaining > 0, "the socket stayed open"
        frame = await comm.receive_output(remaining)
        if frame["type"] == "websocket.close":
            return frame.get("code", 1000)


async def _open(comm: WebsocketCommunicator) -> WebsocketCommunicator:
    connected, code = await comm.connect()
    assert connected, code
    await asyncio.sleep(0.3)  # the follower is started by the connect; let it take its place
    return comm


def _events(type_: str) -> list[dict[str, Any]]:
    from audit.models import Event

    return [e.payload for e in Event.objects.filter(type=type_).order_by("position")]


async def test_a_demoted_admins_list_socket_closes(make_user, issue_token, make_vm) -> None:
    from accounts import commands

    def setup() -> tuple[Any, str]:
        admin = make_user("admin", "boss2")
        make_user("admin", "boss3")  # the last active admin cannot be demoted
        make_vm(make_user("operator", "someone"), name="theirs")
        return admin, issue_token(admin)

    admin, token = await database_sync_to_async(setup)()
    comm = await _open(_token_socket("/ws/vms/live/", token))
    seen = await comm.receive_json_from(5)
    assert seen["vm"]["name"] == "theirs"  # an admin sees every VM
    await database_sync_to_async(commands.set_role)(SHELL, admin, "operator")
    assert await _closed_with(comm) == 4403
    await comm.disconnect()


async def test_a_revoked_token_runs_no_command_on_an_open_exec_socket(
    make_user, issue_token, make_vm
) -> None:
    from accounts import commands
    from accounts.models import APIToken

    def setup() -> tuple[Any, str]:
        owner = make_user("operator", "owner")
        return make_vm(owner), issue_token(owner, name="soon-revoked")

    vm, token = await database_sync_to_async(setup)()
    comm = await _open(_token_socket(f"/ws/vms/{vm.pk}/exec/", token))

    def revoke() -> None:
        commands.revoke_token(SHELL, APIToken.objects.get(name="soon-revoked"))

    await database_sync_to_async(revoke)()
    await comm.send_json_to({"argv": ["id"]})
    assert await _closed_with(comm) == 4401
    await comm.disconnect()
    assert await database_sync_to_async(_events)("vm.exec_requested") == []
    rejected = await database_sync_to_async(_events)("auth.token_rejected")
    assert [r["reason"] for r in rejected] == ["revoked"]


async def test_a_demoted_operators_console_closes(
    make_user, make_vm, ws_connect, console_dir
) -> None:
    from accounts import commands

    def setup() -> tuple[Any, Any]:
        owner = make_user("operator", "typist")
        return owner, make_vm(owner)

    owner, vm = await database_sync_to_async(setup)()
    comm = await _open(await ws_connect(f"/ws/vms/{vm.pk}/console/", owner))
    session = await comm.receive_json_from(5)
    assert session["mode"] == "write"
    await database_sync_to_async(commands.set_role)(SHELL, owner, "viewer")
    assert await _closed_with(comm) == 4403
    await comm.disconnect()
    closed = await database_sync_to_async(_events)("vm.console_closed")
    assert len(closed) == 1  # the session ended, and the log says so


async def test_console_input_rechecks_a_caller_deactivated_without_an_event(
    make_user, make_vm, ws_connect, console_dir
) -> None:
    """Input waits for no event: a user switched off behind the log's back cannot type."""
    from accounts.models import User

    def setup() -> tuple[Any, Any]:
        owner = make_user("operator", "typist2")
        return owner, make_vm(owner)

    owner, vm = await database_sync_to_async(setup)()
    comm = await _open(await ws_connect(f"/ws/vms/{vm.pk}/console/", owner))
    assert (await comm.receive_json_from(5))["mode"] == "write"
    await database_sync_to_async(User.objects.filter(pk=owner.pk).update)(is_active=False)
    await asyncio.sleep(1.1)  # past RECHECK_INPUT_S since the last check
    await comm.send_to(bytes_data=b"reboot\n")
    assert await _closed_with(comm) == 4401
    await comm.disconnect()
    closed = await database_sync_to_async(_events)("vm.console_closed")
    assert closed[0]["input_bytes"] == 0 and closed[0]["ignored_input_bytes"] == 7


async def test_an_expired_token_or_a_logged_out_session_closes_on_the_periodic_check(
    make_user, issue_token, ws_connect, monkeypatch
) -> None:
    from django.contrib.sessions.models import Session

    from accounts.models import APIToken
    from vms import consumers

    monkeypatch.setattr(consumers, "RECHECK_S", 0.3)
    user = await database_sync_to_async(make_user)("operator", "clock")
    token = await database_sync_to_async(issue_token)(user, name="short")
    by_token = await _open(_token_socket("/ws/vms/live/", token))
    by_session = await _open(await ws_connect("/ws/vms/live/", user))
    await database_sync_to_async(APIToken.objects.filter(name="short").update)(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert await _closed_with(by_token, 5) == 4401
    await by_token.disconnect()
    assert await by_session.receive_nothing(1.0)  # the session is still good
    await database_sync_to_async(Session.objects.all().delete)()  # logged out everywhere
    assert await _closed_with(by_session, 5) == 4401
    await by_session.disconnect()


async def test_a_socket_whose_caller_cannot_be_rechecked_closes(
    make_user, ws_connect, monkeypatch
) -> None:
    from channels.layers import get_channel_layer
    from django.db import OperationalError

    from vms import consumers, live

    user = await database_sync_to_async(make_user)("operator", "dbless")
    comm = await _open(await ws_connect("/ws/vms/live/", user))

    def unavailable(scope: Any) -> None:
        raise OperationalError("the database is gone")

    monkeypatch.setattr(consumers, "recheck_socket", unavailable)
    await get_channel_layer().group_send(live.ACCESS_GROUP, {"type": "access.changed"})
    assert await _closed_with(comm, 5) == 1011
    await comm.disconnect()


async def test_console_input_waits_for_a_check_in_flight(
    make_user, make_vm, ws_connect, console_dir, monkeypatch
) -> None:
    """Filed (from the code): a periodic check marked the caller checked before it had its
    answer, so input arriving meanwhile skipped its own check and was delivered although that
    check then closed the socket. Here the check is held in ``allowed()`` (the caller's access
    re-read after the user's), where the consumer takes other messages meanwhile."""
    from vms import consumers

    def setup() -> tuple[Any, Any]:
        owner = make_user("operator", "typist3")
        return owner, make_vm(owner)

    owner, vm = await database_sync_to_async(setup)()
    armed, entered, release = asyncio.Event(), asyncio.Event(), asyncio.Event()
    original = consumers.ConsoleConsumer.allowed

    async def slow(self: Any) -> bool:
        if armed.is_set() and not entered.is_set():  # a periodic check, which finds the
            entered.set()  # caller's access gone once it has its answer
            await release.wait()
            return False
        return await original(self)

    monkeypatch.setattr(consumers.ConsoleConsumer, "allowed", slow)
    monkeypatch.setattr(consumers, "RECHECK_S", 0.2)
    comm = await _open(await ws_connect(f"/ws/vms/{vm.pk}/console/", owner))
    assert (await comm.receive_json_from(5))["mode"] == "write"
    armed.set()
    await asyncio.wait_for(entered.wait(), 5)
    await comm.send_to(bytes_data=b"reboot\n")  # within RECHECK_INPUT_S of that check's start
    await asyncio.sleep(0.3)
    release.set()
    assert await _closed_with(comm) == 4403
    await comm.disconnect()
    closed = await database_sync_to_async(_events)("vm.console_closed")
    assert closed[0]["input_bytes"] == 0 and closed[0]["ignored_input_bytes"] == 7
