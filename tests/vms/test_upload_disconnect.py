"""A client that goes away in the middle of a request body: nothing is done with what came.

a2wsgi's request body took ``http.disconnect`` as the end of the body, so a cut-off upload was
parsed as a complete (shorter) file, sent to the guest and recorded. Served for real (uvicorn
and the thread lanes), with a raw socket that announces more than it sends and closes.
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from audit.models import Event
from sandbox_site import lanes
from tests.served import Served

pytestmark = pytest.mark.django_db(transaction=True)


def _cut_off_upload(
    port: int, path: str, token: str, announced: int, sent: int, *, multipart: bool = False
) -> None:
    """Announce ``announced`` bytes of body, send ``sent`` of them, and close."""
    if multipart:
        method, content_type = "POST", "multipart/form-data; boundary=cut"
        head = (
            b'--cut\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n"
        )
    else:
        method, content_type, head = "PUT", "application/octet-stream", b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(
            (
                f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {announced}\r\n\r\n"
            ).encode()
            + head
        )
        for _ in range(sent // 65536):
            s.sendall(b"x" * 65536)
        time.sleep(0.5)


def test_a_cut_off_upload_is_not_parsed_sent_or_recorded(
    make_user, issue_token, vm_dirs, tmp_path
) -> None:
    from accounts.caller import Caller
    from vms import commands

    owner = make_user("operator", "owner")
    accepted = commands.create(
        Caller.for_user(owner, channel="api"), name="t", template="linux-small"
    )
    commands.record_outcome(accepted.request, "vm.started", {"host": "h", "hypervisor": "qemu"})
    vm_id = accepted.vm.pk
    token = issue_token(owner)
    server = Served(tmp_path / "serve.log").wait_ready()
    try:
        # Streamed (past the read-ahead size) and read ahead (small): both cut off.
        for name, announced, sent in (("big", 3 << 20, 2 << 20), ("small", 200_000, 131_072)):
            url = f"/api/v1/vms/{vm_id}/files/?path=/tmp/{name}"
            _cut_off_upload(server.port, url, token, announced, sent)
            _cut_off_upload(server.port, url, token, announced, sent, multipart=True)
        time.sleep(1.0)
        cut_off = _file_events(vm_id)
        # The control: a complete upload is parsed and requested (and fails: no guest here).
        request = urllib.request.Request(  # noqa: S310 - our own server on 127.0.0.1
            f"{server.url}/api/v1/vms/{vm_id}/files/?path=/tmp/whole",
            data=b"x" * 200_000,
            method="PUT",
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/octet-stream",
            },
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=30)  # noqa: S310
        assert info.value.code == 503, info.value.read()
    finally:
        server.stop()
    assert cut_off == [], cut_off
    assert _file_events(vm_id) == ["vm.file_upload_requested", "vm.file_upload_failed"]


def _file_events(vm_id: Any) -> list[str]:
    return list(
        Event.objects.filter(aggregate_id=str(vm_id), type__startswith="vm.file_")
        .order_by("position")
        .values_list("type", flat=True)
    )


async def _run_lane(receive_messages: list[dict[str, Any]], headers: list[Any]) -> Any:
    seen: dict[str, Any] = {}
    sent: list[dict[str, Any]] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        try:
            seen["body"] = environ["wsgi.input"].read()
        except OSError as exc:
            seen["error"] = exc
        start_response("200 OK", [])
        return [b""]

    messages = iter(receive_messages)

    async def receive() -> dict[str, Any]:
        return next(messages, {"type": "http.disconnect"})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "PUT",
        "path": "/x",
        "query_string": b"",
        "headers": headers,
        "http_version": "1.1",
    }
    await lanes.Lanes(app)(scope, receive, send)
    return seen, sent


@pytest.mark.parametrize("announced", [3 << 20, 1000], ids=["streamed", "read-ahead"])
def test_the_lanes_raise_when_the_client_goes_away_mid_body(announced) -> None:
    parts = [{"type": "http.request", "body": b"x" * 500, "more_body": True}]
    seen, sent = asyncio.run(_run_lane(parts, [(b"content-length", str(announced).encode())]))
    if announced > lanes.BODY_PREREAD_LIMIT:
        assert isinstance(seen.get("error"), lanes.ClientDisconnected), seen
    else:
        assert seen == {} and sent == []  # nothing to run, nobody to answer
