"""A request's status shows the VM as its outcome left it, even when the outcome is recorded
while the status is being read (a worker finishing between the status view's queries)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db


def test_the_vm_beside_a_done_request_is_read_after_its_outcome(
    make_user, token_client, monkeypatch
) -> None:
    from accounts.caller import Caller
    from vms import api, commands

    user = make_user("operator", "owner")
    client = token_client(user)
    accepted = commands.create(
        Caller.for_user(user, channel="api"), name="racing", template="linux-small"
    )
    status_url = f"/api/v1/requests/{accepted.request.event_id}/"
    assert client.get(status_url).json()["vm"]["state"] == "starting"

    looked_up = api._outcome_of

    def finished_meanwhile(event):
        # The worker records the outcome after the view has found the VM, before it looks for
        # the outcome.
        commands.record_outcome(accepted.request, "vm.started", {"host": "h", "hypervisor": "qemu"})
        return looked_up(event)

    monkeypatch.setattr(api, "_outcome_of", finished_meanwhile)
    body = client.get(status_url).json()
    assert body["state"] == "succeeded" and body["outcome"]["type"] == "vm.started"
    assert body["vm"]["state"] == "running" and body["vm"]["pending_type"] in ("", None)
