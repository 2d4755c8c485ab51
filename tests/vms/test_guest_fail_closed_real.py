"""On a real guest: an exec or upload whose request event cannot be appended (the append lock is
held by another session) does not happen; the guest shows no trace of it afterwards."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from audit.models import Event
from vms import commands, worker

pytestmark = [pytest.mark.guest, pytest.mark.django_db(transaction=True)]

MARK = "/tmp/fail-closed-mark"


def test_what_the_log_cannot_record_leaves_no_trace_in_the_guest(
    caller_for, issue_token, vm_dirs, append_lock_held
) -> None:
    owner = caller_for("operator")
    accepted = commands.create(owner, name="closed", template="linux-small")
    assert worker.handle(accepted.request.event_id) == "vm.started"
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {issue_token(owner.user)}")
    url = f"/api/v1/vms/{accepted.vm_id}"
    try:
        with append_lock_held():
            ran = client.post(f"{url}/exec/", {"argv": ["touch", MARK]}, format="json")
            put = client.put(
                f"{url}/files/?path={MARK}-upload",
                b"must not arrive",
                content_type="application/octet-stream",
            )
        assert ran.status_code == 503, ran.content
        assert put.status_code == 503, put.content
        look = client.post(
            f"{url}/exec/",
            {"argv": ["sh", "-c", f"ls {MARK}* 2>/dev/null; echo done"]},
            format="json",
        )
        assert look.status_code == 200, look.content
        assert look.json()["stdout"] == "done\n"  # neither the mark nor the upload exists
        recorded = list(
            Event.objects.filter(aggregate_id=str(accepted.vm_id), type__startswith="vm.")
            .filter(type__regex=r"^vm\.(exec|file)_")
            .values_list("type", flat=True)
            .order_by("position")
        )
        assert recorded == ["vm.exec_requested", "vm.exec_completed"]  # the look, only
    finally:
        destroy = commands.destroy(owner, commands.VirtualMachine.objects.get(pk=accepted.vm_id))
        worker.handle(destroy.request.event_id)
