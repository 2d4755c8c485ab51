"""The real path: ``manage.py worker`` on the test database, its main process starting the pump
within a second of an event (``core.ticks``), the pump's task let through the task guard, a
receiver on 127.0.0.1 getting signed deliveries. Prints the append-to-receipt latency."""

from __future__ import annotations

import json
import statistics
import time

import pytest

from accounts.caller import Caller
from tests.vms.conftest import wait_for
from vms import commands as vm_commands
from webhooks import signing
from webhooks.models import Delivery

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.timeout(240)
def test_the_worker_delivers_each_event_signed_within_seconds(
    receiver, subscribe, make_user, worker
) -> None:
    issued = subscribe(receiver.url, ["vm.created"])
    alice = make_user("operator", "alice")
    caller = Caller.for_user(alice, channel="api")
    # The first one waits for the worker to start (its reconcile, the cluster's processes).
    vm_commands.create(caller, name="warm-up", template="linux-small", start_now=False)
    wait_for(lambda: receiver.requests, 120, "the first delivery through the worker")
    latencies = []
    for i in range(5):
        seen = len(receiver.requests)
        vm = vm_commands.create(caller, name=f"vm{i}", template="linux-small", start_now=False).vm
        appended = time.monotonic()
        wait_for(lambda n=seen: len(receiver.requests) > n, 30, f"delivery {i}", interval=0.02)
        got = receiver.requests[seen]
        latencies.append(got.at - appended)
        assert json.loads(got.body)["event"]["aggregate_id"] == str(vm.pk)
        assert signing.verify(issued.secret, got.body, got.headers["Sandbox-Signature"])
    wait_for(lambda: Delivery.objects.filter(status="delivered").count() == 6, 10, "six delivered")
    print(
        json.dumps(
            {
                "append_to_receipt_s_median": round(statistics.median(latencies), 3),
                "append_to_receipt_s_max": round(max(latencies), 3),
                "n": len(latencies),
            }
        )
    )
    assert max(latencies) < 10
