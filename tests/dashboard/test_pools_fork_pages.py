"""The dashboard's warm pools page and a VM page's fork and idle policy forms (vms.pool_views,
vms.views): who sees and sets what, through the API's own commands, and a fork's progress page."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.contrib.auth.models import Group, Permission
from django.test import Client

from audit.models import Event
from vms import commands, enqueue, images, runtime, worker
from vms.models import PoolTarget, Template, VirtualMachine

pytestmark = pytest.mark.django_db

TEMPLATE = "linux-small"


@pytest.fixture(autouse=True)
def no_queue(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    queued: list[str] = []
    monkeypatch.setattr(enqueue, "async_task", lambda func, *a, **kw: queued.append(func))
    monkeypatch.setattr(enqueue, "request", lambda event_id: queued.append(str(event_id)))
    monkeypatch.setattr(images, "current_image_id", lambda: "img")
    return queued


def client_of(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def targets_set() -> int:
    return Event.objects.filter(type="pool.target_set").count()


# --- The pools page -----------------------------------------------------------------------------


def test_an_admin_sees_the_pools_and_sets_a_target_with_the_apis_event(make_user: Any) -> None:
    admin = make_user("admin", "pool-admin")
    client = client_of(admin)
    page = client.get("/vms/pools/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="nav-pools"' in html and f'data-template="{TEMPLATE}"' in html
    assert f'action="/vms/pools/{TEMPLATE}/target/"' in html  # the form, for admins
    answer = client.post(f"/vms/pools/{TEMPLATE}/target/", {"target": "2"}, follow=True)
    assert answer.redirect_chain == [("/vms/pools/", 302)]
    assert "set to 2 (was 0)" in answer.content.decode()
    event = Event.objects.get(type="pool.target_set")
    assert event.payload == {"template": TEMPLATE, "target": 2, "before": 0}
    assert event.actor_id == str(admin.pk)
    assert PoolTarget.objects.get(template=TEMPLATE).target == 2
    # A member warming: the row counts it and the budget meter shows its memory.
    tpl = Template.objects.get(name=TEMPLATE)
    assert commands.record_pool_warming(tpl, runtime.host_name(), "img") is not None
    html = client.get("/vms/pools/").content.decode()
    assert '<td data-field="warming">1</td>' in html and '<td data-field="target">2</td>' in html
    assert "<meter" in html and f'value="{tpl.memory_mib}"' in html


@pytest.mark.parametrize(
    ("target", "says"),
    [("-1", "from 0 to 64"), ("65", "from 0 to 64"), ("many", "whole number"), ("", "required")],
)
def test_an_invalid_target_is_a_clear_error_and_changes_nothing(
    make_user: Any, target: str, says: str
) -> None:
    client = client_of(make_user("admin", "pool-admin"))
    answer = client.post(f"/vms/pools/{TEMPLATE}/target/", {"target": target})
    assert answer.status_code == 400
    html = answer.content.decode()
    assert says in html and 'aria-invalid="true"' in html
    assert targets_set() == 0 and not PoolTarget.objects.exists()


def test_a_target_for_no_such_template_is_refused(make_user: Any) -> None:
    client = client_of(make_user("admin", "pool-admin"))
    answer = client.post("/vms/pools/no-such-template/target/", {"target": "1"})
    assert answer.status_code == 400 and "no template" in answer.content.decode()
    assert targets_set() == 0


def test_a_reader_of_the_pools_sees_them_but_cannot_set_a_target(make_user: Any) -> None:
    viewer = make_user("viewer", "pool-viewer")
    client = client_of(viewer)
    assert client.get("/vms/pools/").status_code == 403
    assert 'id="nav-pools"' not in client.get("/vms/").content.decode()
    # Permissions come from groups only (accounts.backends): a group that reads the pools.
    readers = Group.objects.create(name="pool-readers")
    readers.permissions.add(Permission.objects.get(codename="view_poolmember"))
    viewer.groups.add(readers)
    viewer = type(viewer).objects.get(pk=viewer.pk)  # no cached permissions
    client = client_of(viewer)
    page = client.get("/vms/pools/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="nav-pools"' in html and 'name="target"' not in html
    assert client.post(f"/vms/pools/{TEMPLATE}/target/", {"target": "1"}).status_code == 403
    assert targets_set() == 0


def test_an_operator_neither_sees_nor_sets_pools(make_user: Any) -> None:
    client = client_of(make_user("operator", "pool-op"))
    assert client.get("/vms/pools/").status_code == 403
    assert client.post(f"/vms/pools/{TEMPLATE}/target/", {"target": "1"}).status_code == 403
    assert 'id="nav-pools"' not in client.get("/vms/").content.decode()
    assert targets_set() == 0


def test_the_pools_page_reads_a_constant_number_of_queries(make_user: Any, settings: Any) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    admin = make_user("admin", "pool-admin")
    client = client_of(admin)
    host = runtime.host_name()
    settings.SANDBOX_POOL_BUDGET_MIB = 1 << 20

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert client.get("/vms/pools/").status_code == 200
        return len(captured.captured_queries)

    one = queries()
    from accounts.caller import Caller

    templates = list(Template.objects.all())
    assert len(templates) > 1
    for tpl in templates:
        commands.set_pool_target(Caller.for_user(admin), tpl.name, 2)
        assert commands.record_pool_warming(tpl, host, "img") is not None
    assert queries() == one


# --- A VM's fork and idle policy forms, and a fork's progress -----------------------------------


def running_vm(user: Any, name: str = "src") -> VirtualMachine:
    from accounts.caller import Caller

    accepted = commands.create(Caller.for_user(user), name=name, template=TEMPLATE)
    commands.record_outcome(accepted.request, "vm.started", {"host": "h1", "hypervisor": "qemu"})
    return VirtualMachine.objects.get(pk=accepted.vm_id)


def fork_vms(source: VirtualMachine) -> list[VirtualMachine]:
    return list(VirtualMachine.objects.exclude(pk=source.pk).order_by("name"))


def test_the_vm_page_forks_and_shows_the_forks_progress_k_of_n(make_user: Any) -> None:
    owner = make_user("operator", "forker")
    vm = running_vm(owner)
    client = client_of(owner)
    page = client.get(f"/vms/{vm.pk}/").content.decode()
    assert 'id="vm-fork"' in page and 'id="vm-idle"' in page
    answer = client.post(f"/vms/{vm.pk}/fork/", {"count": "3"})
    assert answer.status_code == 302
    snapshot_id = answer["Location"].rstrip("/").rsplit("/", 1)[1]
    assert answer["Location"] == f"/vms/{vm.pk}/forks/{snapshot_id}/"
    new = fork_vms(vm)
    assert [v.name for v in new] == ["src-fork-1", "src-fork-2", "src-fork-3"]
    html = client.get(answer["Location"]).content.decode()
    assert 'max="3" value="0"' in html and '<span data-count="pending">3</span>' in html
    # One restores, one fails: 2 of 3 settled, 1 running, 1 failed, 1 pending.
    restores = {
        e.aggregate_id: worker.load_request(str(e.event_id))
        for e in Event.objects.filter(type="vm.restore_requested")
    }
    commands.record_outcome(
        restores[str(new[0].pk)], "vm.restored", {"host": "h1", "hypervisor": "qemu"}
    )
    commands.record_outcome(restores[str(new[1].pk)], "vm.restore_failed", {"reason": "no room"})
    html = client.get(answer["Location"]).content.decode()
    assert 'max="3" value="2"' in html
    for key, n in (("running", 1), ("failed", 1), ("pending", 1)):
        assert f'<span data-count="{key}">{n}</span>' in html
    assert "no room" in html


@pytest.mark.parametrize(
    ("count", "says"), [("0", "from 1 to 10"), ("11", "from 1 to 10"), ("x", "whole number")]
)
def test_a_fork_count_out_of_range_is_refused_on_the_page(
    make_user: Any, count: str, says: str
) -> None:
    owner = make_user("operator", "forker")
    vm = running_vm(owner)
    client = client_of(owner)
    answer = client.post(f"/vms/{vm.pk}/fork/", {"count": count}, follow=True)
    assert answer.redirect_chain == [(f"/vms/{vm.pk}/", 302)]
    assert "Fork refused" in answer.content.decode() and says in answer.content.decode()
    assert fork_vms(vm) == []


def test_a_viewer_may_not_fork_nor_set_the_idle_policy(make_user: Any) -> None:
    vm = running_vm(make_user("operator", "forker"))
    client = client_of(make_user("viewer", "watcher"))
    page = client.get(f"/vms/{vm.pk}/").content.decode()
    assert 'id="vm-fork"' not in page and 'id="vm-idle"' not in page
    vm_events = Event.objects.filter(aggregate_type="vm")
    before = vm_events.count()
    for url, body in (
        (f"/vms/{vm.pk}/fork/", {"count": "1"}),
        (f"/vms/{vm.pk}/idle/", {"idle_timeout_s": "60"}),
    ):
        answer = client.post(url, body, follow=True)
        assert "refused" in answer.content.decode()
    assert vm_events.count() == before and fork_vms(vm) == []


def test_the_idle_form_sets_and_clears_the_policy_and_refuses_bad_input(make_user: Any) -> None:
    owner = make_user("operator", "idler")
    vm = running_vm(owner)
    client = client_of(owner)
    answer = client.post(f"/vms/{vm.pk}/idle/", {"idle_timeout_s": "120"}, follow=True)
    assert "paused after 120 s" in answer.content.decode()
    vm.refresh_from_db()
    assert vm.idle_timeout_s == 120
    answer = client.post(
        f"/vms/{vm.pk}/idle/", {"idle_timeout_s": "90", "idle_to_disk": "on"}, follow=True
    )
    assert "suspended to disk after 90 s" in answer.content.decode()
    vm.refresh_from_db()
    assert (vm.idle_timeout_s, vm.idle_to_disk) == (90, True)
    client.post(f"/vms/{vm.pk}/idle/", {"idle_timeout_s": "off"})
    vm.refresh_from_db()
    assert (vm.idle_timeout_s, vm.idle_to_disk) == (None, False)
    set_before = Event.objects.filter(type="vm.idle_policy_set").count()
    for bad in ("0", "-3", "soon", "99999999999"):
        answer = client.post(f"/vms/{vm.pk}/idle/", {"idle_timeout_s": bad}, follow=True)
        assert "Idle policy refused" in answer.content.decode(), bad
    assert Event.objects.filter(type="vm.idle_policy_set").count() == set_before


def test_the_apis_fork_answer_names_the_forks_status_which_counts_its_vms(
    make_user: Any, token_client: Any
) -> None:
    owner = make_user("operator", "forker")
    vm = running_vm(owner)
    api = token_client(owner)
    answer = api.post(f"/api/v1/vms/{vm.pk}/fork/", {"count": 2}, format="json")
    assert answer.status_code == 202
    body = answer.json()
    assert body["status_url"].startswith("/api/v1/requests/")  # as before
    url = body["fork_status_url"]
    assert url == f"/api/v1/vms/{vm.pk}/forks/{body['snapshot']['id']}/"
    status = api.get(url).json()
    assert (status["count"], status["pending"], status["running"], status["done"]) == (
        2,
        2,
        0,
        False,
    )
    assert {v["id"] for v in status["vms"]} == {v["id"] for v in body["vms"]}
    for v in body["vms"]:
        request = worker.load_request(str(v["request"]["event_id"]))
        commands.record_outcome(request, "vm.restored", {"host": "h1", "hypervisor": "qemu"})
    status = api.get(url).json()
    assert (status["running"], status["pending"], status["settled"], status["done"]) == (
        2,
        0,
        2,
        True,
    )
    # Not a fork of this VM, or no snapshot at all: 404; another operator does not see it.
    assert api.get(f"/api/v1/vms/{vm.pk}/forks/{uuid.uuid4()}/").status_code == 404
    other = running_vm(owner, "other")
    assert api.get(f"/api/v1/vms/{other.pk}/forks/{body['snapshot']['id']}/").status_code == 404
    stranger = token_client(make_user("operator", "stranger"))
    assert stranger.get(url).status_code == 404


def test_the_target_form_needs_the_csrf_token(make_user: Any) -> None:
    import re

    client = Client(enforce_csrf_checks=True)
    client.force_login(make_user("admin", "pool-admin"))
    assert client.post(f"/vms/pools/{TEMPLATE}/target/", {"target": "1"}).status_code == 403
    assert targets_set() == 0
    page = client.get("/vms/pools/").content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert token is not None
    body = {"target": "1", "csrfmiddlewaretoken": token.group(1)}
    assert client.post(f"/vms/pools/{TEMPLATE}/target/", body).status_code == 302
    assert targets_set() == 1
