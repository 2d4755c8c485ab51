"""The serving path's shortcuts: one-query token authentication, one-query pages, the thread
lanes, the C timestamp loader. Each must give what the slower path it replaces gave."""

from __future__ import annotations

import asyncio
import datetime
import threading
import uuid
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.db import connection

from accounts.authentication import lookup
from accounts.models import APIToken
from sandbox_site.lanes import Lanes

pytestmark = pytest.mark.django_db


def _fields(obj: Any) -> dict[str, Any]:
    return {f.attname: getattr(obj, f.attname) for f in obj._meta.concrete_fields}


@pytest.mark.parametrize("role", ["operator", "viewer", "auditor", "admin"])
def test_token_lookup_loads_what_the_orm_loads(make_user, issue_token, role) -> None:
    user = make_user(role)
    scopes = ["vms.exec_vm"] if role in ("operator", "admin") else []
    plaintext = issue_token(user, allowed_ips=["127.0.0.0/8"], scopes=scopes)
    key = plaintext.split("_")[1]
    token = lookup(key)
    assert token is not None
    orm = APIToken.objects.select_related("user").get(key=key)
    assert _fields(token) == _fields(orm)  # JSON lists decoded, datetimes aware
    assert _fields(token.user) == _fields(orm.user)
    assert (
        token.user.get_all_permissions()
        == type(orm.user).objects.get(pk=user.pk).get_all_permissions()
    )
    assert token.user.get_all_permissions()  # every role holds some


def test_token_lookup_sees_group_changes_at_once(make_user, issue_token) -> None:
    user = make_user("viewer")
    key = issue_token(user).split("_")[1]
    assert not lookup(key).user.has_perm("vms.add_virtualmachine")
    user.groups.add(Group.objects.get(name="operator"))
    assert lookup(key).user.has_perm("vms.add_virtualmachine")
    user.groups.clear()
    assert lookup(key).user.get_all_permissions() == set()


def test_token_lookup_of_an_unknown_key_is_none() -> None:
    assert lookup("nosuchkey000") is None


def test_pages_carry_the_same_count_as_a_count_query(make_user, token_client) -> None:
    from accounts.caller import Caller
    from vms import commands

    user = make_user("operator")
    caller = Caller.for_user(user)
    for i in range(7):
        commands.create(caller, name=f"p{i}", template="linux-small", start_now=False)
    client = token_client(user)
    names = []
    for offset in (0, 3, 6):
        page = client.get(f"/api/v1/vms/?limit=3&offset={offset}").json()
        assert page["count"] == 7
        names += [vm["name"] for vm in page["results"]]
    assert names == [f"p{i}" for i in reversed(range(7))]  # newest first, no gaps
    past_end = client.get("/api/v1/vms/?limit=3&offset=50").json()
    assert past_end["count"] == 7 and past_end["results"] == []
    filtered = client.get("/api/v1/vms/?limit=2&name=p1").json()
    assert filtered["count"] == 1 and filtered["results"][0]["name"] == "p1"
    bad = client.get("/api/v1/vms/?owner_id=notanumber")
    assert bad.status_code == 400  # a filter parameter still goes through the filter form


def test_a_read_is_served_while_every_write_thread_waits(monkeypatch) -> None:
    """The lanes: writes stuck (as on the event store's lock) do not hold up reads."""
    monkeypatch.setenv("SANDBOX_WEB_READ_THREADS", "1")
    monkeypatch.setenv("SANDBOX_WEB_WRITE_THREADS", "2")
    release = threading.Event()

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["REQUEST_METHOD"] == "POST":
            release.wait(10)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["REQUEST_METHOD"].encode()]

    app = Lanes(wsgi_app)

    async def call(method: str) -> bytes:
        return (await _asgi_request(app, method))[1]

    async def scenario() -> None:
        writes = [asyncio.ensure_future(call("POST")) for _ in range(3)]
        await asyncio.sleep(0.2)
        assert await asyncio.wait_for(call("GET"), 5) == b"GET"
        assert not any(w.done() for w in writes)
        release.set()
        assert await asyncio.wait_for(asyncio.gather(*writes), 10) == [b"POST"] * 3

    asyncio.run(scenario())


def test_timestamps_are_aware_utc(make_user) -> None:
    user = make_user("viewer")
    fresh = type(user).objects.get(pk=user.pk)
    assert fresh.date_joined.tzinfo is not None
    assert fresh.date_joined.utcoffset() == datetime.timedelta(0)
    assert abs(fresh.date_joined - user.date_joined) < datetime.timedelta(microseconds=1)


def test_postgres_uses_the_c_timestamp_loader(postgres_only) -> None:
    from core import postgres

    if postgres._FAST is None:
        pytest.fail("psycopg's C extension is a dependency (psycopg[binary]) but is missing")
    loader, oid, text = postgres._FAST
    connection.ensure_connection()
    assert connection.connection.adapters.get_loader(oid, text) is loader
    with connection.cursor() as cursor:
        cursor.execute("SELECT TIMESTAMPTZ '2026-01-01 10:00:00.25+02'")
        (value,) = cursor.fetchone()
    assert value == datetime.datetime(2026, 1, 1, 8, 0, 0, 250000, tzinfo=datetime.UTC)
    assert value.tzinfo is datetime.UTC


def _fleet(make_user):
    """Two operators with VMs (one destroyed) and a viewer."""
    from accounts.caller import Caller
    from vms import commands

    alice, bob, viewer = make_user("operator"), make_user("operator"), make_user("viewer")
    for user, count in ((alice, 4), (bob, 3)):
        caller = Caller.for_user(user)
        for i in range(count):
            commands.create(caller, name=f"{user.username}-{i}", template="linux-small")
    gone = commands.create(Caller.for_user(alice), name="gone", template="linux-small")
    commands.record_outcome(gone.request, "vm.start_failed", {"reason": "test"})
    commands.record_outcome(
        commands.destroy(Caller.for_user(alice), gone.vm).request, "vm.destroyed", {}
    )
    return alice, bob, viewer, gone.vm


@pytest.mark.parametrize("who", ["alice", "viewer"])
def test_compiled_list_pages_match_the_orm(make_user, token_client, who) -> None:
    alice, bob, viewer, _ = _fleet(make_user)
    client = token_client({"alice": alice, "viewer": viewer}[who])
    for query in ("", "?limit=2", "?limit=2&offset=2", "?limit=3&offset=6", "?limit=2&offset=99"):
        compiled = client.get(f"/api/v1/vms/{query}")
        sep = "&" if "?" in query else "?"
        orm = client.get(f"/api/v1/vms/{query}{sep}name=")  # a parameter: the ORM's path
        assert compiled.status_code == orm.status_code == 200
        body, expected = compiled.json(), orm.json()
        expected["next"] = expected["next"] and expected["next"].replace("&name=", "")
        expected["previous"] = expected["previous"] and expected["previous"].replace("&name=", "")
        assert body == expected
    everything = client.get("/api/v1/vms/?limit=100").json()
    owners = {vm["owner"] for vm in everything["results"]}
    assert owners == ({alice.username} if who == "alice" else {alice.username, bob.username})
    assert "gone" not in {vm["name"] for vm in everything["results"]}


def test_compiled_retrieve_matches_the_serializer_and_hides_others_vms(
    make_user, token_client
) -> None:
    from vms.api import VMSerializer
    from vms.models import VirtualMachine

    alice, bob, viewer, gone = _fleet(make_user)
    bobs = VirtualMachine.objects.filter(owner=bob).first()
    alices = VirtualMachine.objects.filter(owner=alice).exclude(pk=gone.pk).first()
    as_alice, as_viewer = token_client(alice), token_client(viewer)
    for vm in (alices, gone):  # a destroyed VM is still shown by id
        response = as_alice.get(f"/api/v1/vms/{vm.pk}/")
        assert response.status_code == 200
        assert response.json() == VMSerializer(VirtualMachine.objects.get(pk=vm.pk)).data
    assert as_alice.get(f"/api/v1/vms/{bobs.pk}/").status_code == 404
    assert as_viewer.get(f"/api/v1/vms/{bobs.pk}/").json()["owner"] == bob.username
    assert as_alice.get("/api/v1/vms/not-a-uuid/").status_code == 404
    assert as_alice.get(f"/api/v1/vms/{uuid.uuid4()}/").status_code == 404


async def _asgi_request(
    app: Any, method: str, body_parts: list[bytes] | None = None, headers: list[Any] | None = None
) -> tuple[int, bytes, int]:
    """One HTTP request through an ASGI app: (status, body, number of body messages)."""
    body_parts = body_parts or []
    scope = {
        "type": "http",
        "method": method,
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": headers or [],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1234),
        "root_path": "",
    }
    incoming = [
        {"type": "http.request", "body": part, "more_body": i < len(body_parts) - 1}
        for i, part in enumerate(body_parts or [b""])
    ]
    status, chunks = 0, []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        else:
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks), len(chunks)


def _asgi_call(app: Any, method: str, body_parts: list[bytes], headers: list[Any]) -> Any:
    return asyncio.run(_asgi_request(app, method, body_parts, headers))


def test_lanes_stream_large_bodies_both_ways() -> None:
    from sandbox_site import lanes

    big = [bytes([i]) * (600 * 1024) for i in range(3)]  # 1.8 MiB: past both limits

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> Any:
        received = environ["wsgi.input"].read()
        start_response("201 Created", [("Content-Type", "application/octet-stream")])
        if environ["REQUEST_METHOD"] == "POST":
            return [str(len(received)).encode(), b":", received[:1], received[-1:]]
        return iter(big)

    app = lanes.Lanes(wsgi_app)
    status, body, messages = _asgi_call(app, "GET", [], [])
    assert (status, body) == (201, b"".join(big))
    assert messages > 1  # sent as it was produced, not held whole
    small_status, small, small_messages = _asgi_call(
        app, "POST", [b"abc"], [(b"content-length", b"3")]
    )
    assert (small_status, small, small_messages) == (201, b"3:ac", 1)  # read ahead, one reply
    upload = [b"x" * (700 * 1024), b"y" * (700 * 1024)]
    status, body, _ = _asgi_call(
        app, "POST", upload, [(b"content-length", str(1400 * 1024).encode())]
    )
    assert (status, body) == (201, f"{1400 * 1024}:xy".encode())  # streamed to the app


@pytest.mark.parametrize(
    ("method", "path", "lane"),
    [
        ("GET", "/api/v1/vms/", "reads"),
        ("HEAD", "/healthz", "reads"),
        ("POST", "/api/v1/vms/", "writes"),
        ("DELETE", "/api/v1/vms/5a4d0000-0000-4000-8000-0000c0ffee00/", "writes"),
        ("POST", "/api/v1/vms/5a4d0000-0000-4000-8000-0000c0ffee00/exec/", "long"),
        ("POST", "/api/v1/vms/5a4d0000-0000-4000-8000-0000c0ffee00/files/", "long"),
        ("GET", "/api/v1/vms/5a4d0000-0000-4000-8000-0000c0ffee00/files/", "long"),
        ("GET", "/api/v1/audit/exports/5a4d0000-0000-4000-8000-0000c0ffee00/download/", "long"),
        ("GET", "/audit/sessions/12/cast", "long"),
        ("GET", "/vms/5a4d0000-0000-4000-8000-0000c0ffee00/exec/", "long"),
    ],
)
def test_requests_that_wait_on_guests_or_stream_files_take_the_long_lane(
    method, path, lane
) -> None:
    app = Lanes(lambda environ, start_response: [])
    assert app.lane_for({"method": method, "path": path}) is getattr(app, lane)
