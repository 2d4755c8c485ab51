"""A secret's life on a real QEMU guest, and where its value may not go.

One run: a secret is stored through the API, given to a VM at create (a variable and a file),
given to one exec as a file, printed by an HTTP exec and a websocket exec, downloaded as a file,
shown on a console session that is recorded (and typed into it), snapshotted, and an evidence
bundle is exported. Then the value (and its base64) is searched for, and must be absent, in
every table of the database (a pg_dump on PostgreSQL), the log records, the events, the
snapshot directory's metadata, the bundle and the recording; everything that carried guest
output says ``[secret:NAME]`` instead.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import subprocess
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.db import connection
from django.urls import re_path
from rest_framework.test import APIClient

from audit import exports
from audit.models import Event
from vms import commands, console, runtime, worker
from vms.exec_consumer import ExecConsumer
from vms.models import Snapshot, VirtualMachine

pytestmark = [pytest.mark.guest, pytest.mark.django_db(transaction=True)]

EXEC_APP = URLRouter([re_path(r"^ws/vms/(?P<vm_id>[0-9a-f-]+)/exec/$", ExecConsumer.as_asgi())])


def forms_of(value: str) -> list[bytes]:
    raw = value.encode()
    return [raw, base64.b64encode(raw).rstrip(b"="), raw.hex().encode()]


def assert_absent(where: str, data: bytes | str, values: list[str]) -> None:
    blob = data.encode() if isinstance(data, str) else data
    for value in values:
        for form in forms_of(value):
            assert form not in blob, f"{value!r} found in {where} (as {form[:12]!r}...)"


def run_pending(vm_id: str) -> str:
    vm = VirtualMachine.objects.get(pk=vm_id)
    assert vm.pending_request, vm
    return worker.handle(vm.pending_request)


def database_text() -> bytes:
    """Every row of every table; on PostgreSQL a real pg_dump of the test database too."""
    out = []
    with connection.cursor() as cur:
        for table in connection.introspection.table_names():
            cur.execute(f'SELECT * FROM "{table}"')  # noqa: S608 (names from the catalog)
            out.extend(repr(row) for row in cur.fetchall())
    text = "\n".join(out).encode()
    if connection.vendor == "postgresql":
        db = connection.settings_dict
        dump = subprocess.run(  # noqa: S603 (fixed argv)
            [
                "pg_dump",
                "-h",
                db["HOST"] or "127.0.0.1",
                "-p",
                str(db["PORT"] or 5432),
                "-U",
                db["USER"],
                "--data-only",
                db["NAME"],
            ],
            capture_output=True,
            check=True,
            timeout=120,
        )
        assert b"COPY public.secretstore_secret" in dump.stdout
        text += dump.stdout
    return text


async def ws_exec(user, vm_id: str, body: dict) -> list[dict]:
    communicator = WebsocketCommunicator(EXEC_APP, f"/ws/vms/{vm_id}/exec/")
    communicator.scope["user"] = user
    connected, _ = await communicator.connect()
    assert connected
    await communicator.send_to(text_data=json.dumps(body))
    frames = []
    while True:
        frame = json.loads(await communicator.receive_from(timeout=60))
        frames.append(frame)
        if frame["type"] in ("exit", "error"):
            break
    await communicator.disconnect()
    return frames


class _Watcher:
    """A console subscriber, as the websocket consumer is: records and collects the output."""

    def __init__(self, recording: console.Recording) -> None:
        self.recording = recording
        self.seen = bytearray()

    def deliver(self, chunk: bytes) -> None:
        self.recording.output(chunk)
        self.seen += chunk

    def notify(self, status: dict) -> None:
        pass


async def console_session(vm: VirtualMachine, path: Path, typed: bytes) -> bytes:
    """Attach to the guest's serial console, show the secret file, type the value too."""
    rt = runtime.runtime_dir(vm.pk)
    hub = console.ConsoleHub(str(vm.pk), rt.serial_socket, rt.serial_log)
    masker = await database_sync_to_async(console.masker_for_vm)(vm.pk)
    recording = console.Recording(
        path, cols=120, rows=40, title="secrets", record_input=True, masker=masker
    )
    watcher = _Watcher(recording)
    await hub._attach(watcher)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not hub.connected:
            assert loop.time() < deadline, "the serial link did not come up"
            await asyncio.sleep(0.1)
        for keys in (b"\r", b"cat /run/secrets/api_key; echo; echo shown-$((6*7))\r"):
            recording.input(keys)
            assert await hub.send_input(keys)
            await asyncio.sleep(0.5)
        # The operator types the value itself (one key at a time, as a terminal sends it).
        for byte in typed:
            recording.input(bytes([byte]))
            await hub.send_input(bytes([byte]))
        recording.input(b"\r")
        await hub.send_input(b"\r")
        while b"shown-42" not in watcher.seen or watcher.seen.count(b"[secret:API_KEY]") < 2:
            assert loop.time() < deadline, f"console output: {bytes(watcher.seen)[-400:]!r}"
            await asyncio.sleep(0.2)
        await recording.flush(final=True)
    finally:
        await hub._detach(watcher)
    return bytes(watcher.seen)


def test_a_secret_given_to_a_guest_appears_nowhere(
    caller_for, issue_token, vm_dirs, settings, caplog, tmp_path
) -> None:
    caplog.set_level(logging.DEBUG)
    settings.SANDBOX_EXEC_RECORD_OUTPUT = True  # output in events too: masked there as well
    settings.SANDBOX_CONSOLE_DIR = tmp_path / "console"
    settings.SANDBOX_AUDIT_EXPORT_DIR = tmp_path / "exports"
    value = f"sbx-{os.urandom(12).hex()}-value"
    other = f"exec-{os.urandom(12).hex()}-only"
    owner = caller_for("operator")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {issue_token(owner.user)}")

    for name, secret in (("API_KEY", value), ("ONE_OFF", other)):
        r = client.post("/api/v1/secrets/", {"name": name, "value": secret}, format="json")
        assert r.status_code == 201, r.content
    created = client.post(
        "/api/v1/vms/",
        {
            "name": "keeper",
            "template": "linux-small",
            "secrets": [
                {"name": "API_KEY", "env": "API_KEY"},
                {"name": "API_KEY", "file": "/run/secrets/api_key"},
            ],
        },
        format="json",
    )
    assert created.status_code == 202, created.content
    vm_id = created.json()["vm"]["id"]
    assert run_pending(vm_id) == "vm.started", VirtualMachine.objects.get(pk=vm_id).last_error
    vm = VirtualMachine.objects.get(pk=vm_id)
    try:
        # An HTTP exec printing the variable, the file, its base64, and an exec-only secret.
        script = (
            'echo "env=$API_KEY"; cat /run/secrets/api_key; echo; '
            "base64 /run/secrets/api_key; cat /tmp/one-off; echo; "
            "stat -c %a /run/secrets/api_key"
        )
        r = client.post(
            f"/api/v1/vms/{vm_id}/exec/",
            {
                "argv": ["sh", "-c", script],
                "secrets": [{"name": "ONE_OFF", "file": "/tmp/one-off"}],
            },
            format="json",
        )
        assert r.status_code == 200, r.content
        body = r.json()
        assert body["exit_code"] == 0, body
        assert body["stdout"].splitlines() == [
            "env=[secret:API_KEY]",
            "[secret:API_KEY]",
            "[secret:API_KEY]",
            "[secret:ONE_OFF]",
            "600",
        ], body["stdout"]
        assert_absent("the HTTP exec's answer", r.content, [value, other])

        # The websocket exec: the value split over the stream's chunks still comes out masked.
        frames = async_to_sync(ws_exec)(
            owner.user,
            vm_id,
            {
                "argv": [
                    "sh",
                    "-c",
                    'for c in $(echo "$API_KEY" | fold -w3); do printf %s $c; '
                    "sleep 0.1; done; echo",
                ]
            },  # fmt: skip
        )
        assert frames[-1]["type"] == "exit" and frames[-1]["exit_code"] == 0, frames[-1]
        streamed = "".join(f["data"] for f in frames if f["type"] == "stdout")
        assert streamed == "[secret:API_KEY]\n", streamed
        assert_absent("the websocket frames", json.dumps(frames), [value, other])

        # A download of the file holding it.
        down = client.get(f"/api/v1/vms/{vm_id}/files/?path=/run/secrets/api_key")
        assert down.status_code == 200
        content = b"".join(down.streaming_content)
        assert content == b"[secret:API_KEY]"
        assert down["Content-Length"] == str(len(content))

        # A recorded console session that shows it (and where it is typed).
        seen = async_to_sync(console_session)(
            vm, settings.SANDBOX_CONSOLE_DIR / "keeper.cast", value.encode()
        )
        assert b"shown-42" in seen
        assert_absent("the console output", seen, [value])
        recording = (settings.SANDBOX_CONSOLE_DIR / "keeper.cast").read_bytes()
        assert b"[secret:API_KEY]" in recording
        assert_absent("the console recording", recording, [value, other])

        # A snapshot.
        snap = client.post(f"/api/v1/vms/{vm_id}/snapshot/", {"name": "s"}, format="json")
        assert snap.status_code == 202, snap.content
        assert run_pending(vm_id) == "vm.snapshotted"
        snapshot = Snapshot.objects.get(pk=snap.json()["snapshot"]["id"])
        assert snapshot.state == "ready", snapshot.last_error
        snap_dir = runtime.snapshot_dir(snapshot.pk)
        # Its metadata: every file but the guest's own memory and disk images.
        images = {name for name in snapshot.manifest if _is_guest_image(snap_dir / name)}
        metadata = [p for p in snap_dir.rglob("*") if p.is_file() and p.name not in images]
        assert metadata, sorted(p.name for p in snap_dir.rglob("*"))
        for path in metadata:
            assert_absent(f"snapshot metadata {path.name}", path.read_bytes(), [value, other])
        assert_absent("the snapshot's row", repr(snapshot.manifest), [value, other])
    finally:
        destroy = commands.destroy(owner, VirtualMachine.objects.get(pk=vm_id))
        worker.handle(destroy.request.event_id)
    # The VMM's own runtime directory (its raw serial log among it) goes with the VM.
    assert not runtime.runtime_dir(vm.pk).root.exists()

    # An evidence bundle over the run.
    auditor = caller_for("auditor")
    audit_client = APIClient()
    audit_client.credentials(HTTP_AUTHORIZATION=f"Bearer {issue_token(auditor.user)}")
    now = datetime.now(UTC)
    job = audit_client.post(
        "/api/v1/audit/bundles/",
        {
            "since": (now - timedelta(hours=1)).isoformat(),
            "until": (now + timedelta(hours=1)).isoformat(),
        },
        format="json",
    )
    assert job.status_code in (201, 202), job.content
    assert exports.run_export(job.json()["id"]) == "done"
    detail = audit_client.get(f"/api/v1/audit/exports/{job.json()['id']}/").json()
    bundle = b"".join(audit_client.get(detail["download_url"]).streaming_content)
    with zipfile.ZipFile(io.BytesIO(bundle)) as archive:
        names = archive.namelist()
        assert any(n.endswith(".jsonl") for n in names), names
        for name in names:
            assert_absent(f"bundle member {name}", archive.read(name), [value, other])

    # The events: every secret event names it and its HMAC, the guest events name it too.
    events = list(Event.objects.order_by("position"))
    assert_absent("the events", "\n".join(e.data for e in events), [value, other])
    by_type = {e.type: e.payload for e in events}
    assert by_type["secret.created"]["hmac"] and "value" not in by_type["secret.created"]
    assert [s["name"] for s in by_type["vm.created"]["secrets"]] == ["API_KEY", "API_KEY"]
    assert by_type["vm.started"]["secrets"][0]["file"] == "/run/secrets/api_key"
    requested = [e.payload for e in events if e.type == "vm.exec_requested"]
    assert requested[0]["secrets"][0]["name"] == "ONE_OFF" and "API_KEY" in requested[0]["env_keys"]
    completed = [e.payload for e in events if e.type == "vm.exec_completed"]
    assert completed[0]["masked_secrets"] == ["API_KEY", "ONE_OFF"]
    assert "[secret:API_KEY]" in completed[0]["stdout"]
    downloaded = next(e.payload for e in events if e.type == "vm.file_downloaded")
    assert downloaded["masked_secrets"] == ["API_KEY"]

    # The database, the log records.
    assert_absent("the database", database_text(), [value, other])
    assert_absent("the log records", caplog.text, [value, other])
    assert_absent("the log records' arguments", repr([r.args for r in caplog.records]), [value])


def _is_guest_image(path: Path) -> bool:
    """The guest's memory or a disk: binary images of the guest itself (they hold whatever the
    guest held, as its RAM and disk do; not metadata)."""
    with path.open("rb") as fh:
        head = fh.read(4096)
    return b"\0" in head or path.stat().st_size > (4 << 20)
