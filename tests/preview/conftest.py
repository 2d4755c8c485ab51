"""Preview URL fixtures: a guest stand-in (HTTP and websocket) on 127.0.0.1, the product served
for real, and a running VM whose address is that stand-in's.

The VM's NIC wiring is not what these tests are about (the network tests boot real guests): a VM
row is made through the commands and then given ``state=running`` and ``ip=127.0.0.1`` directly
in the read model, so the proxy finds the stand-in where a guest's address would be. Traffic goes
only to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn

from tests.served import Served, free_port

PREVIEW_DOMAIN = "preview.localhost"
DENIED_PORT = 9  # SANDBOX_PREVIEW_DENIED_PORTS of the served product


async def guest_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """What a guest's web app does, reduced to what the tests look at: it tells what it saw."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]
    if scope["type"] == "websocket":
        await receive()  # connect
        if scope["path"] == "/ws-redirect":  # to this same server's websocket
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": 302,
                    "headers": [(b"location", b"/ws"), (b"content-length", b"0")],
                }
            )
            await send({"type": "websocket.http.response.body", "body": b""})
            return
        subprotocols = scope.get("subprotocols") or []
        await send(
            {"type": "websocket.accept", "subprotocol": subprotocols[0] if subprotocols else None}
        )
        await send(
            {
                "type": "websocket.send",
                "text": json.dumps(
                    {
                        "headers": headers,
                        "path": scope["path"],
                        "query": scope["query_string"].decode(),
                    }
                ),
            }
        )
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") == "close-please":
                await send({"type": "websocket.close", "code": 4321})
                return
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": "echo:" + message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"][::-1]})
    path = scope["path"]
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if path == "/stream":
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        for i in range(5):
            await send(
                {"type": "http.response.body", "body": f"chunk{i}\n".encode(), "more_body": True}
            )
            await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/redirect":
        await send(
            {
                "type": "http.response.start",
                "status": 302,
                "headers": [(b"location", b"/elsewhere"), (b"content-length", b"0")],
            }
        )
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/slow":
        await asyncio.sleep(30)
    extra = []
    if path == "/cookies":
        extra = [
            (b"set-cookie", b"app=1; Path=/"),
            (b"set-cookie", b"wide=1; Domain=preview.localhost; Path=/"),
            (b"set-cookie", b"sbx_preview=forged; Path=/"),
            (b"set-cookie", b"sessionid=forged; Path=/"),
        ]
    out = json.dumps(
        {
            "method": scope["method"],
            "path": path,
            "query": scope["query_string"].decode(),
            "headers": headers,
            "body_len": len(body),
            "body_head": body[:32].decode("latin-1"),
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(out)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": out})


class GuestStandIn:
    """The guest app served by uvicorn on 127.0.0.1 in a thread of the test process."""

    def __init__(self) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            guest_app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> GuestStandIn:
        self.thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise AssertionError("the guest stand-in did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def guest() -> Iterator[GuestStandIn]:
    stand_in = GuestStandIn().start()
    yield stand_in
    stand_in.stop()


def serve_previews(log: Path, **env: str) -> Served:
    """The product served with the preview settings the tests expect, and ``env``."""
    return Served(
        log,
        **{
            "SANDBOX_PREVIEW_DOMAIN": PREVIEW_DOMAIN,
            "SANDBOX_PREVIEW_DENIED_PORTS": str(DENIED_PORT),
            **env,
        },
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, django_db_blocker: Any) -> Iterator[Served]:
    """The product (uvicorn, the real ASGI application) on the test database."""
    log = tmp_path_factory.mktemp("preview") / "serve.log"
    with django_db_blocker.unblock():
        server = serve_previews(log, SANDBOX_PREVIEW_READ_TIMEOUT_S="2")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture
def running_vm(transactional_db: Any) -> Callable[..., Any]:
    """A VM of ``owner``, running at 127.0.0.1 (see the module docstring)."""
    from accounts.caller import Caller
    from vms import commands
    from vms.models import VirtualMachine

    def make(
        owner: Any, name: str = "web", ip: str | None = "127.0.0.1", state: str = "running"
    ) -> Any:
        vm = commands.create(
            Caller.for_user(owner, channel="api"),
            name=name,
            template="linux-small",
            start_now=False,
        ).vm
        VirtualMachine.objects.filter(pk=vm.pk).update(state=state, ip=ip)
        vm.refresh_from_db()
        return vm

    return make


def preview_host(vm: Any, port: int, served: Served) -> str:
    return f"{port}-{vm.pk}.{PREVIEW_DOMAIN}:{served.port}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def share(owner_token: str, vm: Any, port: int, served: Any, **body: Any) -> str:
    """A shareable link made through the API; returns its path and query."""
    response = httpx.post(
        f"{served.url}/api/v1/vms/{vm.pk}/previews/",
        json={"port": port, **body},
        headers=bearer(owner_token),
        trust_env=False,
    )
    assert response.status_code == 201, response.text
    url = urlsplit(response.json()["url"])
    assert url.hostname == f"{port}-{vm.pk}.{PREVIEW_DOMAIN}"
    return f"{url.path}?{url.query}"


def grant_cookie(response: httpx.Response) -> str:
    """The preview cookie a link response set, as ``name=value``."""
    set_cookie = response.headers["set-cookie"]
    return set_cookie.split(";", 1)[0]
