"""API tokens on the websockets: the same limits as over HTTP (``accounts.scopes``).

A handshake with ``Authorization: Bearer <token>`` is authenticated like an API request (expiry,
revocation, addresses); each consumer applies the token's read-only flag and scopes before it
accepts, and one that forgot would have its accept turned into a close.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.utils import timezone

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def ws_dirs(settings: Any, tmp_path: Path) -> Iterator[None]:
    run = Path(f"/tmp/sbxt-{os.getpid()}-{int(time.monotonic() * 1000) % 100000}")
    run.mkdir(parents=True)
    settings.SANDBOX_RUNTIME_DIR = run
    settings.SANDBOX_CONSOLE_DIR = tmp_path / "console"
    yield
    shutil.rmtree(run, ignore_errors=True)


@pytest.fixture
async def follower_stopped(transactional_db: Any) -> AsyncIterator[None]:
    yield
    from django.db import connections

    from vms import live

    live.stop_follower()
    await database_sync_to_async(connections.close_all)()


@pytest.fixture
def world(make_user, issue_token) -> dict[str, Any]:
    from accounts.caller import Caller
    from vms import commands

    owner = make_user("operator", "owner")
    caller = Caller.for_user(owner, channel="api")
    vm = commands.create(caller, name="w", template="linux-small", start_now=False).vm
    return {"owner": owner, "vm": vm}


def communicator(path: str, token: str | None) -> WebsocketCommunicator:
    from sandbox_site.asgi import application

    headers = [(b"origin", b"http://127.0.0.1")]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    return WebsocketCommunicator(application, path, headers=headers)


async def connect(path: str, token: str | None) -> tuple[bool, Any, WebsocketCommunicator]:
    comm = communicator(path, token)
    connected, code = await comm.connect()
    return connected, code, comm


async def test_exec_socket_applies_read_only_and_scopes(world, issue_token) -> None:
    issue = database_sync_to_async(issue_token)
    path = f"/ws/vms/{world['vm'].pk}/exec/"
    for token, want in (
        (await issue(world["owner"], read_only=True), 4403),
        (await issue(world["owner"], scopes=["vms.read_files"]), 4403),
        (await issue(world["owner"], scopes=["vms.exec_vm"]), True),
        (await issue(world["owner"]), True),
    ):
        connected, code, comm = await connect(path, token)
        assert (connected or code) == want, (token, connected, code)
        await comm.disconnect()

    def reasons() -> list[str]:
        from audit.models import Event

        return [e.payload["reason"] for e in Event.objects.filter(type="auth.token_rejected")]

    # Refused uses are recorded, as over HTTP.
    assert sorted(await database_sync_to_async(reasons)()) == ["out_of_scope", "read_only"]


async def test_dead_or_misplaced_tokens_are_refused_at_the_handshake(world, issue_token) -> None:
    from accounts.models import APIToken

    issue = database_sync_to_async(issue_token)
    expired = await issue(world["owner"], name="expired")
    revoked = await issue(world["owner"], name="revoked")
    elsewhere = await issue(world["owner"], allowed_ips=["10.0.0.0/8"], name="net")

    def age() -> None:
        APIToken.objects.filter(name="expired").update(
            expires_at=timezone.now() - timedelta(seconds=1)
        )
        APIToken.objects.filter(name="revoked").update(revoked_at=timezone.now())

    await database_sync_to_async(age)()
    for token in (expired, revoked, elsewhere, "sbx_garbage"):
        for path in (f"/ws/vms/{world['vm'].pk}/exec/", "/ws/vms/live/"):
            connected, code, comm = await connect(path, token)
            assert not connected and code == 4401, (token, path, code)
            await comm.disconnect()


async def test_live_sockets_need_a_vm_scope(
    world, make_user, issue_token, follower_stopped
) -> None:
    def tokens() -> tuple[str, str]:
        admin = make_user("admin", "boss")
        return (
            issue_token(world["owner"], scopes=["vms.exec_vm"]),
            issue_token(admin, scopes=["audit.view_audit_trail"]),
        )

    vm_scoped, audit_only = await database_sync_to_async(tokens)()
    for path in ("/ws/vms/live/", f"/ws/vms/{world['vm'].pk}/live/"):
        connected, _, comm = await connect(path, vm_scoped)
        assert connected, path
        await comm.disconnect()
        connected, code, comm = await connect(path, audit_only)
        assert not connected and code == 4403, path
        await comm.disconnect()


async def test_console_with_a_read_only_token_only_watches(
    world, issue_token, ws_dirs, follower_stopped
) -> None:
    issue = database_sync_to_async(issue_token)
    path = f"/ws/vms/{world['vm'].pk}/console/"
    for token, mode in (
        (await issue(world["owner"]), "write"),
        (await issue(world["owner"], read_only=True), "read"),
        (await issue(world["owner"], scopes=["vms.exec_vm"]), "read"),
        (await issue(world["owner"], scopes=["vms.console_vm"]), "write"),
    ):
        connected, _, comm = await connect(path, token)
        assert connected
        while True:
            message = json.loads(await comm.receive_from(5))
            if message.get("type") == "session":
                break
        assert message["mode"] == mode, (token, message)
        await comm.disconnect()


async def test_a_consumer_that_forgets_the_token_check_cannot_accept(world, issue_token) -> None:
    from channels.generic.websocket import AsyncWebsocketConsumer
    from channels.routing import URLRouter
    from django.urls import path

    from accounts.authentication import TokenAuthMiddleware

    class Careless(AsyncWebsocketConsumer):
        async def connect(self) -> None:
            await self.accept()

    app = TokenAuthMiddleware(URLRouter([path("ws/careless/", Careless.as_asgi())]))
    token = await database_sync_to_async(issue_token)(world["owner"])
    comm = WebsocketCommunicator(
        app, "/ws/careless/", headers=[(b"authorization", f"Bearer {token}".encode())]
    )
    connected, code = await comm.connect()
    assert not connected and code == 4403
    await comm.disconnect()
    # Without a token (a browser session), it is the consumer's own business.
    comm = WebsocketCommunicator(app, "/ws/careless/")
    assert (await comm.connect())[0]
    await comm.disconnect()
