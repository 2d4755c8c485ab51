"""On a real guest: a running VM past its lifetime is stopped by the worker's tick and the worker,
through the ordinary stop request, which says why (reason lifetime)."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from django.utils.module_loading import import_string

from audit.models import Event
from vms import commands, lifetimes, worker
from vms.models import VirtualMachine

pytestmark = [pytest.mark.guest, pytest.mark.django_db(transaction=True)]


def test_a_running_vm_past_its_lifetime_is_stopped_and_the_log_says_why(
    caller_for: Any, vm_dirs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import django_q.tasks

    from vms import images

    image = images.ensure_built()
    monkeypatch.setenv("SANDBOX_IMAGE_DIR", str(image.directory))
    # The cluster's part, in this process: the tick's run is carried out at once.
    ran: list[Any] = []
    monkeypatch.setattr(
        django_q.tasks, "async_task", lambda func, **kw: ran.append(import_string(func)())
    )
    monkeypatch.setattr(lifetimes, "_enqueued_at", None)
    owner = caller_for("operator")
    accepted = commands.create(owner, name="lifetime-guest", template="linux-small")
    try:
        assert worker.handle(accepted.request.event_id) == "vm.started"
        vm = VirtualMachine.objects.get(pk=accepted.vm_id)
        commands.set_lifetime(owner, vm, timeout_s=1)
        lifetimes.tick(timezone.now())  # not ended yet: nothing asked
        assert ran == []
        vm.refresh_from_db()
        assert vm.expires_at is not None
        time.sleep(max(0.0, (vm.expires_at - timezone.now()).total_seconds()) + 0.2)
        lifetimes.tick(timezone.now())  # the task, too, reads the clock: the end has come
        assert ran == [1]
        stop = Event.objects.get(type="vm.stop_requested", aggregate_id=str(vm.pk))
        assert stop.payload["reason"] == "lifetime" and stop.payload["expired_at"]
        assert (stop.actor_type, stop.actor_name) == ("system", "lifetime")
        assert worker.handle(str(stop.event_id)) == "vm.stopped"
        vm.refresh_from_db()
        assert (vm.state, vm.expires_at) == ("stopped", None)
        stopped = Event.objects.get(type="vm.stopped", causation_id=str(stop.event_id))
        assert stopped.payload["graceful"] is True, stopped.payload
        # Once: a later tick finds nothing to end.
        lifetimes.tick(timezone.now() + timedelta(seconds=60))
        assert ran == [1]
    finally:
        vm = VirtualMachine.objects.get(pk=accepted.vm_id)
        if vm.state != "destroyed":
            destroy = commands.destroy(owner, vm)
            worker.handle(destroy.request.event_id)
