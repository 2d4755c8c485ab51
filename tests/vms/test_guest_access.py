"""Guest access through the API without a guest: the upload forms the docs promise, permission
checked before a body is parsed, and status URLs that always resolve.

The guest itself is replaced by a recording stand-in for ``vms.guest.agent_session`` where the
test is about the web tier (what reaches the agent client, and what the API answers); the
behaviour of real guests is in tests/guests and the guest-marked tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from typing import Any

import pytest
from rest_framework.test import APIClient

from vms import commands
from vms.models import VirtualMachine

pytestmark = pytest.mark.django_db


class FakeAgent:
    """Takes uploads like the agent client does (reads the source in chunks, hashes it)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def put_file(self, source: Any, path: str, **_: Any) -> Any:
        from vms.agent.client import Transfer, _iter_source

        data = b"".join(_iter_source(source))
        self.files[path] = data
        return Transfer(path, len(data), hashlib.sha256(data).hexdigest())


@pytest.fixture
def running_vm(make_user, vm_dirs) -> VirtualMachine:
    from accounts.caller import Caller

    owner = make_user("operator", "owner")
    accepted = commands.create(
        Caller.for_user(owner, channel="api"), name="t", template="linux-small"
    )
    commands.record_outcome(accepted.request, "vm.started", {"host": "h", "hypervisor": "qemu"})
    return VirtualMachine.objects.get(pk=accepted.vm.pk)


@pytest.fixture
def fake_agent(monkeypatch) -> FakeAgent:
    from vms import guest

    agent = FakeAgent()

    @contextlib.contextmanager
    def session(vm: Any, **_: Any) -> Any:
        yield agent

    monkeypatch.setattr(guest, "agent_session", session)
    return agent


def client_for(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def test_multipart_upload_as_documented(running_vm, fake_agent, issue_token) -> None:
    # curl -F file=@x ".../files/?path=/tmp/x"
    client = client_for(issue_token(running_vm.owner))
    data = b"multipart body \x00\xff" * 1000
    response = client.post(
        f"/api/v1/vms/{running_vm.pk}/files/?path=/tmp/x",
        {"file": io.BytesIO(data)},
        format="multipart",
    )
    assert response.status_code == 201, response.content
    assert response.json() == {
        "path": "/tmp/x",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert fake_agent.files["/tmp/x"] == data


@pytest.mark.parametrize("method", ["put", "post"])
def test_raw_upload_without_content_disposition(
    running_vm, fake_agent, issue_token, method
) -> None:
    # curl -T x ".../files/?path=/tmp/raw" (or --data-binary @x): no filename anywhere
    client = client_for(issue_token(running_vm.owner))
    data = bytes(range(256)) * 12000  # beyond the in-memory upload size: spooled to a file
    response = getattr(client, method)(
        f"/api/v1/vms/{running_vm.pk}/files/?path=/tmp/raw",
        data,
        content_type="application/octet-stream",
    )
    assert response.status_code == 201, response.content
    assert response.json()["sha256"] == hashlib.sha256(data).hexdigest()
    assert fake_agent.files["/tmp/raw"] == data


@pytest.mark.parametrize(
    "content_type",
    ["", "application/x-www-form-urlencoded"],  # curl -T; curl --data-binary @x
    ids=["no-content-type", "curl-data-binary"],
)
def test_raw_upload_whatever_curl_calls_it(
    running_vm, fake_agent, issue_token, content_type
) -> None:
    client = client_for(issue_token(running_vm.owner))
    data = b"a=b&c=d\x00\x01 not a form"
    response = client.generic(
        "PUT", f"/api/v1/vms/{running_vm.pk}/files/?path=/tmp/curl", data, CONTENT_TYPE=content_type
    )
    assert response.status_code == 201, response.content
    assert fake_agent.files["/tmp/curl"] == data


def test_upload_without_a_body_is_a_clear_400(running_vm, fake_agent, issue_token) -> None:
    client = client_for(issue_token(running_vm.owner))
    response = client.post(
        f"/api/v1/vms/{running_vm.pk}/files/?path=/tmp/x", {"other": "field"}, format="multipart"
    )
    assert response.status_code == 400
    assert "file" in response.json()
    assert fake_agent.files == {}


@pytest.mark.parametrize("role", ["viewer", "auditor"])
@pytest.mark.parametrize("form", ["multipart", "raw", "unparseable"])
def test_readers_get_403_before_the_body_is_parsed(
    running_vm, fake_agent, make_user, issue_token, monkeypatch, role, form
) -> None:
    from rest_framework.parsers import FileUploadParser, MultiPartParser

    parsed: list[str] = []
    for parser in (FileUploadParser, MultiPartParser):
        original = parser.parse

        def spy(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            parsed.append(type(self).__name__)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(parser, "parse", spy)
    client = client_for(issue_token(make_user(role)))
    url = f"/api/v1/vms/{running_vm.pk}/files/?path=/tmp/x"
    if form == "multipart":
        response = client.post(url, {"file": io.BytesIO(b"data")}, format="multipart")
    elif form == "raw":
        response = client.put(url, b"data", content_type="application/octet-stream")
    else:  # a multipart body without a boundary: parsing it would be a 400
        response = client.generic("POST", url, b"junk", content_type="multipart/form-data")
    assert response.status_code == 403, response.content
    assert parsed == []
    assert fake_agent.files == {}


def test_status_url_of_a_create_without_start_resolves(make_user, issue_token) -> None:
    client = client_for(issue_token(make_user("operator")))
    created = client.post(
        "/api/v1/vms/", {"name": "later", "template": "linux-small", "start": False}, format="json"
    )
    assert created.status_code == 201, created.content
    status = client.get(created.json()["status_url"])
    assert status.status_code == 200, status.content
    body = status.json()
    assert body["state"] == "succeeded"
    assert body["request"]["type"] == "vm.created"
    assert body["outcome"]["event_id"] == body["request"]["event_id"]
    assert body["vm"]["state"] == "stopped"
    started = client.post(f"/api/v1/vms/{created.json()['vm']['id']}/start/")
    assert started.status_code == 202
    assert client.get(started.json()["status_url"]).json()["state"] == "pending"
