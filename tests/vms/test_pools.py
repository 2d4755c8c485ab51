"""Warm pools without guests (vms.pools, vms.commands): targets, the budget, the admin API, and a
hand-out's transaction (the guest side: test_pools_guest.py)."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from django.db import connection

from audit.models import Event
from vms import commands, enqueue, images, runtime
from vms.models import PoolMember, PoolTarget, Template

pytestmark = pytest.mark.django_db(transaction=True)

TEMPLATE = "linux-small"


@pytest.fixture(autouse=True)
def no_queue(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    queued: list[str] = []
    monkeypatch.setattr(enqueue, "async_task", lambda func, *a, **kw: queued.append(func))
    return queued


@pytest.fixture(autouse=True)
def current_image(monkeypatch: pytest.MonkeyPatch) -> str:
    """The guest image new VMs get, as this host says (no image is built for these tests)."""
    monkeypatch.setattr(images, "current_image_id", lambda: "img")
    return "img"


def _ready_member(template: str = TEMPLATE, image_id: str = "img") -> uuid.UUID:
    """A member as the log would have it once warmed (no VMM: these tests stop at the log)."""
    tpl = Template.objects.get(name=template)
    member_id = commands.record_pool_warming(tpl, runtime.host_name(), image_id)
    assert member_id is not None
    commands.record_pool_warmed(member_id, {"paused": True})
    return member_id


def test_a_target_is_set_by_admins_with_an_event_and_a_refill(
    caller_for: Any, no_queue: list[str]
) -> None:
    commands.set_pool_target(caller_for("admin"), TEMPLATE, 3)
    assert PoolTarget.objects.get(template=TEMPLATE).target == 3
    event = Event.objects.get(type="pool.target_set")
    assert event.payload == {"template": TEMPLATE, "target": 3, "before": 0}
    assert no_queue == ["vms.tasks.refill_pools"]


def test_warming_stops_at_the_target_and_at_the_budget(caller_for: Any, settings: Any) -> None:
    tpl = Template.objects.get(name=TEMPLATE)
    commands.set_pool_target(caller_for("admin"), TEMPLATE, 3)
    settings.SANDBOX_POOL_BUDGET_MIB = 2 * tpl.memory_mib
    host = runtime.host_name()
    assert commands.record_pool_warming(tpl, host, "img") is not None
    assert commands.record_pool_warming(tpl, host, "img") is not None
    # The budget holds two: the third is refused although the target is three.
    assert commands.record_pool_warming(tpl, host, "img") is None
    settings.SANDBOX_POOL_BUDGET_MIB = 10 * tpl.memory_mib
    assert commands.record_pool_warming(tpl, host, "img") is not None
    assert commands.record_pool_warming(tpl, host, "img") is None  # the target
    assert PoolMember.objects.filter(template=TEMPLATE).count() == 3
    assert commands.pool_memory_used() == 3 * tpl.memory_mib


def test_a_pool_member_never_counts_against_its_future_owners_quota(caller_for: Any) -> None:
    from vms.models import Usage

    commands.set_pool_target(caller_for("admin"), TEMPLATE, 1)
    _ready_member()
    owner = caller_for("operator")
    assert not Usage.objects.filter(user=owner.user, vms__gt=0).exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [({"target": -1}, "target"), ({"target": "many"}, "target"), ({}, "target")],
)
def test_the_target_api_refuses_bad_input_and_changes_nothing(
    make_user: Any, token_client: Any, body: dict[str, Any], field: str
) -> None:
    client = token_client(make_user("admin"))
    answer = client.put(f"/api/v1/pools/{TEMPLATE}/", body, format="json")
    assert answer.status_code == 400 and field in answer.json()
    assert not Event.objects.filter(type="pool.target_set").exists()


def test_only_admins_see_and_set_pools(make_user: Any, token_client: Any) -> None:
    operator = token_client(make_user("operator"))
    assert operator.get("/api/v1/pools/").status_code == 403
    assert operator.put(f"/api/v1/pools/{TEMPLATE}/", {"target": 1}).status_code == 403
    assert operator.patch(f"/api/v1/pools/{TEMPLATE}/", {"target": 1}).status_code == 403
    assert not Event.objects.filter(type="pool.target_set").exists()
    admin = token_client(make_user("admin"))
    assert admin.put("/api/v1/pools/no-such-template/", {"target": 1}).status_code == 404
    answer = admin.patch(f"/api/v1/pools/{TEMPLATE}/", {"target": 2}, format="json")
    assert answer.status_code == 200 and answer.json()["target"] == 2
    listed = admin.get("/api/v1/pools/").json()
    assert {"template": TEMPLATE, "target": 2, "ready": 0, "warming": 0, "memory_mib": 0} in (
        listed["pools"]
    )
    assert listed["budget_mib"] >= 0


def test_a_hand_out_takes_a_member_with_the_create_and_a_plain_create_does_not(
    caller_for: Any, no_queue: list[str]
) -> None:
    commands.set_pool_target(caller_for("admin"), TEMPLATE, 2)
    member_id = _ready_member()
    owner = caller_for("operator")
    plain = commands.create(owner, name="plain", template=TEMPLATE)
    assert plain.pooled is None and "vms.tasks.run_request" in no_queue
    no_queue.clear()
    # Not poolable: another shape than the template's.
    other = commands.create(owner, name="bigger", template=TEMPLATE, memory_mib=512, from_pool=True)
    assert other.pooled is None
    no_queue.clear()
    pooled = commands.create(owner, name="pooled", template=TEMPLATE, from_pool=True)
    assert pooled.pooled is not None and pooled.vm_id == member_id
    assert no_queue == []  # the caller finishes the hand-out; no worker task
    assert pooled.vm.state == "starting" and pooled.vm.owner_id == owner.user.pk
    assert not PoolMember.objects.filter(pk=member_id).exists()
    handed = Event.objects.get(type="pool.vm_handed_out")
    created = Event.objects.get(type="vm.created", aggregate_id=str(member_id))
    assert handed.payload["vm_id"] == str(member_id) and created.payload["from_pool"] is True
    assert handed.position > created.position  # one append


def test_concurrent_creates_take_one_member_once(caller_for: Any, postgres_only: None) -> None:
    commands.set_pool_target(caller_for("admin"), TEMPLATE, 1)
    member_id = _ready_member()
    owners = [caller_for("operator") for _ in range(4)]
    results: list[Any] = [None] * len(owners)
    go = threading.Barrier(len(owners))

    def create(i: int) -> None:
        try:
            go.wait()
            results[i] = commands.create(owners[i], name=f"r{i}", template=TEMPLATE, from_pool=True)
        finally:
            connection.close()

    threads = [threading.Thread(target=create, args=(i,)) for i in range(len(owners))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    pooled = [r for r in results if r is not None and r.pooled is not None]
    assert [r.vm_id for r in pooled] == [member_id]
    assert all(r is not None for r in results)
    assert Event.objects.filter(type="pool.vm_handed_out").count() == 1


def test_a_member_unlike_what_the_vm_is_recorded_as_is_never_handed_out(
    caller_for: Any, no_queue: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Members of an older guest image, or of the template's shape before an admin changed
    it, wait for the refill's eviction: a create meanwhile is not handed one (its VM would be
    recorded as what it is not), it starts the ordinary way."""
    commands.set_pool_target(caller_for("admin"), TEMPLATE, 3)
    old_image = _ready_member(image_id="older")
    old_shape = _ready_member()
    tpl = Template.objects.get(name=TEMPLATE)
    tpl.memory_mib *= 2
    tpl.save()
    owner = caller_for("operator")
    made = commands.create(owner, name="fresh", template=TEMPLATE, from_pool=True)
    assert made.pooled is None and "vms.tasks.run_request" in no_queue
    assert made.vm.memory_mib == tpl.memory_mib
    assert set(PoolMember.objects.values_list("pk", flat=True)) == {old_image, old_shape}
    assert not Event.objects.filter(type="pool.vm_handed_out").exists()
    # One of the template's shape now, on the current image: handed out.
    good = _ready_member()
    again = commands.create(owner, name="pooled", template=TEMPLATE, from_pool=True)
    assert again.pooled is not None and again.vm_id == good
    # No current image on this host: nothing is handed out.
    _ready_member()
    monkeypatch.setattr(images, "current_image_id", lambda: None)
    none = commands.create(owner, name="no-image", template=TEMPLATE, from_pool=True)
    assert none.pooled is None


def test_a_hand_outs_append_saves_each_projections_checkpoint_at_its_own_event_at_once(
    caller_for: Any, no_queue: list[str]
) -> None:
    """The create's one append feeds three inline projections (the VM, its task, the pool):
    one statement saves their checkpoints, each at the last event it projected."""
    from django.test.utils import CaptureQueriesContext

    from audit.models import ProjectionCheckpoint

    commands.set_pool_target(caller_for("admin"), TEMPLATE, 1)
    member_id = _ready_member()
    owner = caller_for("operator")
    commands.create(owner, name="first", template=TEMPLATE)  # the default network made first
    with CaptureQueriesContext(connection) as queries:
        commands.create(owner, name="pooled", template=TEMPLATE, from_pool=True)
    writes = [q["sql"] for q in queries.captured_queries if "projectioncheckpoint" in q["sql"]]
    assert len(writes) == 1, writes
    saved = dict(ProjectionCheckpoint.objects.values_list("name", "position"))
    handed = Event.objects.get(type="pool.vm_handed_out")
    requested = Event.objects.get(aggregate_id=str(member_id), type="vm.start_requested")
    assert saved["vms.pools"] == handed.position
    assert saved["vms.state"] == saved["vms.tasks"] == requested.position < handed.position
