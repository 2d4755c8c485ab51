"""An HTTP exec that prints far more than it may return, on a real guest: the answer holds at
most SANDBOX_EXEC_OUTPUT_LIMIT bytes of each stream, says it was truncated and gives the full
sizes; the event records the full sizes and digests."""

from __future__ import annotations

import hashlib

import pytest
from rest_framework.test import APIClient

from audit.models import Event
from vms import commands, worker

pytestmark = [pytest.mark.guest, pytest.mark.django_db(transaction=True)]

LIMIT = 64 << 10
TOTAL = 20_000_000


def test_a_20_mb_exec_answers_within_the_cap(caller_for, issue_token, vm_dirs, settings) -> None:
    settings.SANDBOX_EXEC_OUTPUT_LIMIT = LIMIT
    owner = caller_for("operator")
    accepted = commands.create(owner, name="chatty", template="linux-small")
    assert worker.handle(accepted.request.event_id) == "vm.started"
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {issue_token(owner.user)}")
    script = f"head -c {TOTAL} /dev/zero | tr '\\0' o; head -c {TOTAL} /dev/zero | tr '\\0' e >&2"
    try:
        response = client.post(
            f"/api/v1/vms/{accepted.vm_id}/exec/",
            {"argv": ["sh", "-c", script], "timeout": 300},
            format="json",
        )
        assert response.status_code == 200, response.content
        # Text and base64 of each stream's first LIMIT bytes, and a little more.
        assert len(response.content) < 2 * LIMIT * (1 + 4 / 3) + 4096, len(response.content)
        body = response.json()
        assert body["exit_code"] == 0
        assert body["truncated"] is True
        assert body["stdout_truncated"] is True and body["stderr_truncated"] is True
        assert (body["stdout_size"], body["stderr_size"]) == (TOTAL, TOTAL)
        assert body["stdout"] == "o" * LIMIT and body["stderr"] == "e" * LIMIT
        event = Event.objects.get(position=body["event_position"]).payload
        assert (event["stdout_size"], event["stderr_size"]) == (TOTAL, TOTAL)
        assert event["stdout_sha256"] == hashlib.sha256(b"o" * TOTAL).hexdigest()
        small = client.post(
            f"/api/v1/vms/{accepted.vm_id}/exec/", {"argv": ["echo", "hi"]}, format="json"
        ).json()
        assert small["truncated"] is False and small["stdout"] == "hi\n"
        assert (small["stdout_size"], small["stderr_size"]) == (3, 0)
    finally:
        destroy = commands.destroy(owner, commands.VirtualMachine.objects.get(pk=accepted.vm_id))
        worker.handle(destroy.request.event_id)


def test_a_failed_upload_leaves_the_next_exec_answering_at_once(
    caller_for, issue_token, vm_dirs
) -> None:
    import os
    import time

    owner = caller_for("operator")
    accepted = commands.create(owner, name="full", template="linux-small")
    assert worker.handle(accepted.request.event_id) == "vm.started"
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {issue_token(owner.user)}")
    url = f"/api/v1/vms/{accepted.vm_id}"
    try:
        small = "mkdir -p /tmp/small && mount -t tmpfs -o size=1m tmpfs /tmp/small"
        mounted = client.post(f"{url}/exec/", {"argv": ["sh", "-c", small]}, format="json")
        assert mounted.json()["exit_code"] == 0, mounted.json()
        upload = client.put(
            f"{url}/files/?path=/tmp/small/big",
            os.urandom(24 << 20),
            content_type="application/octet-stream",
        )
        assert upload.status_code == 502, upload.content
        assert "no_space" in upload.content.decode()
        for attempt in range(2):
            started = time.monotonic()
            run = client.post(f"{url}/exec/", {"argv": ["echo", str(attempt)]}, format="json")
            assert run.status_code == 200, run.content
            assert run.json()["stdout"] == f"{attempt}\n"
            assert time.monotonic() - started < 8
    finally:
        destroy = commands.destroy(owner, commands.VirtualMachine.objects.get(pk=accepted.vm_id))
        worker.handle(destroy.request.event_id)
