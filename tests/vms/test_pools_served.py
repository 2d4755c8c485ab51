"""A warm pool through the product as it is served: the admin's target over the API, the worker
process warming members, a user's create handed one by the web process (201, running) and its
first exec answered there, the worker refilling. Run in each supported configuration (.ci/run)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from audit.models import Event
from tests.sdk.conftest import served  # noqa: F401 - the web tier on the test database
from vms.models import PoolMember

pytestmark = [pytest.mark.guest, pytest.mark.django_db(transaction=True)]

TEMPLATE = "linux-small"


def _pool(admin: httpx.Client) -> dict[str, Any]:
    answer = admin.get("/api/v1/pools/")
    assert answer.status_code == 200, answer.text
    found = [p for p in answer.json()["pools"] if p["template"] == TEMPLATE]
    return found[0] if found else {"target": 0, "ready": 0, "warming": 0}


def _wait(what: str, predicate: Any, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def test_a_served_create_is_handed_a_warm_member_and_the_worker_refills(
    served: Any,  # noqa: F811
    worker: Any,
    make_user: Any,
    issue_token: Any,
) -> None:
    headers = {"Accept": "application/json"}
    admin = httpx.Client(
        base_url=served.url,
        headers={**headers, "Authorization": f"Bearer {issue_token(make_user('admin'))}"},
        timeout=120,
    )
    user = httpx.Client(
        base_url=served.url,
        headers={**headers, "Authorization": f"Bearer {issue_token(make_user('operator'))}"},
        timeout=120,
    )
    with admin, user:
        set_target = admin.put(f"/api/v1/pools/{TEMPLATE}/", json={"target": 1})
        assert set_target.status_code == 200, set_target.text
        _wait("a ready member", lambda: _pool(admin)["ready"] == 1)
        (member,) = PoolMember.objects.values_list("pk", flat=True)

        made = user.post("/api/v1/vms/", json={"name": "warm-one", "template": TEMPLATE})
        assert made.status_code == 201, made.text
        vm = made.json()["vm"] if "vm" in made.json() else made.json()
        assert vm["id"] == str(member) and vm["state"] == "running"
        ran = user.post(f"/api/v1/vms/{vm['id']}/exec/", json={"argv": ["hostname"]})
        assert ran.status_code == 200, ran.text
        assert ran.json()["stdout"] == "warm-one\n"

        handed = Event.objects.get(type="pool.vm_handed_out", aggregate_id=str(member))
        assert handed.payload["vm_id"] == str(member) and handed.payload["name"] == "warm-one"
        started = Event.objects.get(type="vm.started", aggregate_id=str(member))
        assert started.payload["from_pool"] is True

        # The worker warms another; the one handed out never comes back.
        _wait("the pool refilled", lambda: _pool(admin)["ready"] == 1)
        assert not PoolMember.objects.filter(pk=member).exists()

        gone = user.delete(f"/api/v1/vms/{vm['id']}/")
        assert gone.status_code in (200, 202), gone.text
        emptied = admin.put(f"/api/v1/pools/{TEMPLATE}/", json={"target": 0})
        assert emptied.status_code == 200, emptied.text
        _wait("the pool emptied", lambda: not PoolMember.objects.exists())
        assert Event.objects.filter(type="pool.vm_evicted").count() >= 1
