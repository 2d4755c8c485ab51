"""File transfer and action hardening (issue 10 review): a request never names a file of the
host, an upload is bounded and leaves no temporary file behind, who may act is decided before
a body is validated, and API errors are JSON.

The guest is a recording stand-in for ``vms.guest.agent_session`` (what reaches the agent
client); the client's own refusals are tested on the real ``AgentClient`` over a socket pair.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from audit.models import Event
from vms import commands, guest
from vms.agent.client import AgentClient, AgentError, Transfer, _iter_source
from vms.models import VirtualMachine

pytestmark = pytest.mark.django_db


class FakeAgent:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.fail: Exception | None = None

    def put_file(self, source: Any, path: str, **_: Any) -> Transfer:
        if self.fail is not None:
            raise self.fail
        data = b"".join(_iter_source(source))
        self.files[path] = data
        return Transfer(path, len(data), hashlib.sha256(data).hexdigest())

    def get_file(self, path: str, dest: Any, **_: Any) -> Transfer:
        if self.fail is not None:
            raise self.fail
        dest.write(b"guest bytes")
        return Transfer(path, 11, hashlib.sha256(b"guest bytes").hexdigest())


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> FakeAgent:
    fake = FakeAgent()

    @contextlib.contextmanager
    def session(vm: Any, **_: Any) -> Any:
        yield fake

    monkeypatch.setattr(guest, "agent_session", session)
    return fake


@pytest.fixture
def vm(make_user: Any, vm_dirs: Any) -> VirtualMachine:
    from accounts.caller import Caller

    owner = make_user("operator", "owner")
    accepted = commands.create(
        Caller.for_user(owner, channel="api"), name="t", template="linux-small"
    )
    commands.record_outcome(accepted.request, "vm.started", {"host": "h", "hypervisor": "qemu"})
    return VirtualMachine.objects.get(pk=accepted.vm.pk)


def client_for(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


@pytest.fixture
def owner_api(vm: VirtualMachine, issue_token: Any) -> APIClient:
    return client_for(issue_token(vm.owner))


def file_events(vm: VirtualMachine) -> list[str]:
    return list(
        Event.objects.filter(aggregate_id=str(vm.pk), type__startswith="vm.file_")
        .order_by("position")
        .values_list("type", flat=True)
    )


# --- F1: a request never makes the host open one of its files ----------------------------------


@pytest.mark.parametrize("value", ["/etc/hostname", "hello", "/proc/self/environ"])
def test_a_multipart_text_field_named_file_is_a_400_and_reads_nothing(
    vm, agent, owner_api, value
) -> None:
    # curl -F file=/etc/hostname (no @): a text field, not a file part
    response = owner_api.post(
        f"/api/v1/vms/{vm.pk}/files/?path=/tmp/leak", {"file": value}, format="multipart"
    )
    assert response.status_code == 400, response.content
    assert "file" in response.json()
    assert agent.files == {}
    assert file_events(vm) == []


@pytest.mark.parametrize("source", ["/etc/hostname", Path("/etc/hostname")])
def test_guest_upload_refuses_a_name_before_recording_anything(vm, agent, source) -> None:
    from accounts.caller import Caller

    with pytest.raises(TypeError):
        guest.upload(Caller.for_user(vm.owner, channel="api"), vm, "/tmp/x", source)
    assert agent.files == {}
    assert file_events(vm) == []


@pytest.mark.parametrize("dest", ["/tmp/chosen", Path("/tmp/chosen")])
def test_guest_download_refuses_a_host_path(vm, agent, dest) -> None:
    from accounts.caller import Caller

    with pytest.raises(TypeError):
        guest.download(Caller.for_user(vm.owner, channel="api"), vm, "/etc/passwd", dest)
    assert file_events(vm) == []


class SilentAgent:
    """The other end of a socket pair: records what the client sends, answers nothing."""

    def __init__(self) -> None:
        self.host, self.guest = socket.socketpair()
        self.guest.settimeout(0.3)

    def received(self) -> bytes:
        data = b""
        with contextlib.suppress(TimeoutError, OSError):
            while chunk := self.guest.recv(65536):
                data += chunk
        return data


@pytest.fixture
def silent() -> Any:
    agent = SilentAgent()
    client = AgentClient(agent.host, timeout=1)
    yield client, agent
    client.close()
    agent.guest.close()


@pytest.mark.parametrize("source", ["/etc/hostname", Path("/etc/hostname")])
def test_the_agent_client_never_opens_a_name_given_as_an_upload(silent, source) -> None:
    client, agent = silent
    with pytest.raises(TypeError):
        client.put_file(source, "/tmp/x")
    with pytest.raises(TypeError):
        client.exec(["cat"], stdin=Path("/etc/hostname"))
    assert agent.received() == b""  # no put, no exec: refused before anything was sent


@pytest.mark.parametrize("dest", ["/tmp/chosen", Path("/tmp/chosen")])
def test_the_agent_client_writes_no_host_path_from_get_file(silent, dest) -> None:
    client, agent = silent
    with pytest.raises(TypeError):
        client.get_file("/etc/passwd", dest)
    assert agent.received() == b""


def test_host_file_entry_points_stay_inside_their_directory(silent, tmp_path) -> None:
    client, agent = silent
    inside = tmp_path / "inside"
    inside.mkdir()
    (tmp_path / "secret").write_bytes(b"no")
    with pytest.raises(ValueError, match="not a file inside"):
        client.put_host_file(inside / ".." / "secret", "/tmp/x", within=inside)
    with pytest.raises(ValueError, match="not a file inside"):
        client.put_host_file(Path("/etc/hostname"), "/tmp/x", within=inside)
    with pytest.raises(ValueError, match="not a file inside"):
        client.get_host_file("/etc/passwd", tmp_path / "secret", within=inside)
    assert agent.received() == b""
    assert (tmp_path / "secret").read_bytes() == b"no"


# --- F6: who may act, and on what, before the body is validated --------------------------------

BAD_BODIES: list[tuple[str, str, Any]] = [
    ("post", "start/", None),
    ("post", "stop/", {"grace_s": "x"}),
    ("post", "reboot/", None),
    ("post", "pause/", None),
    ("post", "resume/", None),
    ("post", "resize/", {"vcpus": "x"}),
    ("post", "snapshot/", {"name": ["not", "a", "name"]}),
    ("post", "exec/", {"argv": []}),
    ("put", "files/?path=relative", {"file": "text"}),
    ("post", "files/?path=relative", {"file": "text"}),
    ("get", "files/?path=relative", None),
    ("delete", "", None),
]


@pytest.mark.parametrize(("method", "suffix", "body"), BAD_BODIES)
@pytest.mark.parametrize(("role", "expected"), [("viewer", 403), ("other-operator", 404)])
def test_every_vm_action_checks_the_caller_before_the_body(
    vm, agent, make_user, issue_token, method, suffix, body, role, expected
) -> None:
    user = make_user("operator" if role == "other-operator" else role)
    client = client_for(issue_token(user))
    url = f"/api/v1/vms/{vm.pk}/{suffix}"
    kwargs = {"format": "json"} if body is not None and suffix != "files/" else {}
    response = getattr(client, method)(url, body, **kwargs)
    assert response.status_code == expected, (url, response.content)
    assert agent.files == {}


@pytest.mark.parametrize(("role", "expected"), [("viewer", 403), ("other-operator", 404)])
def test_snapshot_clone_checks_the_caller_before_the_body(
    vm, make_user, issue_token, role, expected
) -> None:
    from accounts.caller import Caller
    from vms.models import Snapshot

    accepted = commands.snapshot(Caller.for_user(vm.owner, channel="api"), vm, name="s")
    snap = Snapshot.objects.get(pk=accepted.snapshot.pk) if accepted.snapshot else None
    assert snap is not None
    user = make_user("operator" if role == "other-operator" else role)
    client = client_for(issue_token(user))
    response = client.post(f"/api/v1/snapshots/{snap.pk}/clone/", {"name": ""}, format="json")
    assert response.status_code == expected, response.content


# --- F8: bounded uploads, no temporary file left ------------------------------------------------


def _open_upload_temporaries() -> set[str]:
    fd_dir = Path("/proc/self/fd")
    names = set()
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.endswith(".upload") or ".upload (deleted)" in target:
                names.add(target)
    return names


@pytest.mark.parametrize("form", ["raw", "multipart"])
def test_a_failed_upload_leaves_no_temporary_file_open(vm, agent, owner_api, form) -> None:
    gc.collect()
    before = _open_upload_temporaries()
    agent.fail = AgentError("io_error", "disk on fire")
    data = os.urandom(3 << 20)  # past the in-memory size: spooled to a file
    url = f"/api/v1/vms/{vm.pk}/files/?path=/tmp/x"
    gc.disable()  # what the garbage collector would close later does not count
    try:
        if form == "raw":
            response = owner_api.put(url, data, content_type="application/octet-stream")
        else:
            response = owner_api.post(url, {"file": io.BytesIO(data)}, format="multipart")
        assert response.status_code == 502, response.content
        assert _open_upload_temporaries() - before == set()
    finally:
        gc.enable()


def test_an_upload_over_the_limit_is_413_before_it_is_spooled(
    vm, agent, owner_api, settings
) -> None:
    settings.SANDBOX_UPLOAD_MAX_BYTES = 1000
    response = owner_api.put(
        f"/api/v1/vms/{vm.pk}/files/?path=/tmp/big",
        b"x" * 1001,
        content_type="application/octet-stream",
    )
    assert response.status_code == 413, response.content
    assert agent.files == {}
    assert file_events(vm) == []
    ok = owner_api.put(
        f"/api/v1/vms/{vm.pk}/files/?path=/tmp/fits",
        b"x" * 1000,
        content_type="application/octet-stream",
    )
    assert ok.status_code == 201, ok.content


def test_the_spool_stops_at_the_limit_whatever_the_length_said(rf, settings) -> None:
    from vms.api import UploadSpool, UploadTooLarge

    spool = UploadSpool(rf.put("/"), max_bytes=10)
    spool.new_file("file", "upload", "application/octet-stream", None)
    spool.receive_data_chunk(b"x" * 10, 0)
    with pytest.raises(UploadTooLarge):
        spool.receive_data_chunk(b"y", 10)
    spool.close_all()
    assert spool.file.closed


# --- F9: JSON errors, a directory path, pagination ----------------------------------------------


def test_api_errors_are_json_even_when_html_is_asked_for(vm, owner_api) -> None:
    missing = "5a4d0000-0000-4000-8000-0000c0ffee00"
    for url in (f"/api/v1/vms/{missing}/", f"/api/v1/vms/{vm.pk}/exec/"):
        response = owner_api.get(url, HTTP_ACCEPT="text/html")
        assert response.status_code in (404, 405), response.content
        assert response["Content-Type"].startswith("application/json")
        assert "detail" in response.json()


@pytest.mark.parametrize(
    ("code", "status"), [("is_a_directory", 400), ("not_a_directory", 400), ("not_found", 404)]
)
def test_a_path_the_guest_refuses_is_the_callers_error(vm, agent, owner_api, code, status) -> None:
    agent.fail = AgentError(code, "/tmp: the path is a directory")
    response = owner_api.put(
        f"/api/v1/vms/{vm.pk}/files/?path=/tmp", b"x", content_type="application/octet-stream"
    )
    assert response.status_code == status, response.content
    assert response.json()["code"] == code
    assert file_events(vm) == ["vm.file_upload_requested", "vm.file_upload_failed"]


def test_a_limit_above_the_maximum_is_lowered_as_documented(rf) -> None:
    from rest_framework.request import Request

    from core.pagination import MAX_LIMIT, Pagination

    assert Pagination().get_limit(Request(rf.get("/", {"limit": "1001"}))) == MAX_LIMIT == 1000
    docs = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    assert "larger is lowered to 1000" in docs
