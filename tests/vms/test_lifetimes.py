"""VM lifetimes against the projections (no guests): set at create or from the template, set,
extended and cleared by the owner, validated, and ended once by the system through the ordinary
stop or destroy request, with the reason in its data."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.utils import timezone

from audit import projections
from audit.models import Event
from vms import commands, lifetimes
from vms.models import Template, VirtualMachine

pytestmark = pytest.mark.django_db


def types_of(vm_id: Any) -> list[str]:
    return list(
        Event.objects.filter(aggregate_id=str(vm_id))
        .order_by("position")
        .values_list("type", flat=True)
    )


def vm_events() -> int:
    return Event.objects.filter(aggregate_type="vm").count()


def running_vm(caller: Any, name: str = "box", **create: Any) -> VirtualMachine:
    accepted = commands.create(caller, name=name, template="linux-small", **create)
    commands.record_outcome(accepted.request, "vm.started", {"host": "h1", "hypervisor": "qemu"})
    return VirtualMachine.objects.get(pk=accepted.vm_id)


def later(seconds: float) -> datetime:
    return timezone.now() + timedelta(seconds=seconds)


# --- Setting it -----------------------------------------------------------------------------------


def test_a_lifetime_given_at_create_is_an_event_before_the_first_start(caller_for) -> None:
    caller = caller_for("operator")
    before = timezone.now()
    accepted = commands.create(caller, name="web", template="linux-small", timeout_s=600)
    assert types_of(accepted.vm_id) == [
        "vm.created",
        "net.ip_leased",
        "vm.lifetime_set",
        "vm.start_requested",
    ]
    data = Event.objects.get(type="vm.lifetime_set").payload
    assert data["timeout_s"] == 600 and data["on_expiry"] == "stop"
    expires = datetime.fromisoformat(data["expires_at"])
    assert before + timedelta(seconds=600) <= expires <= timezone.now() + timedelta(seconds=600)
    vm = accepted.vm
    assert (vm.expires_at, vm.on_expiry, vm.state) == (expires, "stop", "starting")


def test_a_vm_takes_its_templates_lifetime_and_what_its_end_does(caller_for) -> None:
    Template.objects.filter(name="linux-small").update(timeout_s=120, on_expiry="destroy")
    caller = caller_for("operator")
    accepted = commands.create(caller, name="short", template="linux-small", start_now=False)
    data = Event.objects.get(type="vm.lifetime_set", aggregate_id=str(accepted.vm_id)).payload
    assert (data["timeout_s"], data["on_expiry"]) == (120, "destroy")
    created = Event.objects.get(type="vm.created", aggregate_id=str(accepted.vm_id)).payload
    assert created["on_expiry"] == "destroy"
    # 0 asks for none, over the template's.
    none = commands.create(caller, name="long", template="linux-small", timeout_s=0)
    assert "vm.lifetime_set" not in types_of(none.vm_id)
    assert none.vm.expires_at is None


def test_no_lifetime_no_event(caller_for) -> None:
    accepted = commands.create(caller_for("operator"), name="plain", template="linux-small")
    assert "vm.lifetime_set" not in types_of(accepted.vm_id)
    assert accepted.vm.expires_at is None


@pytest.mark.parametrize("bad", [-1, 604_801, True, "60", 1.5, None])
def test_a_lifetime_out_of_bounds_or_not_whole_seconds_is_refused(caller_for, bad) -> None:
    caller = caller_for("operator")
    vm = running_vm(caller)
    events = vm_events()
    with pytest.raises(ValidationError) as exc:
        commands.set_lifetime(caller, vm, timeout_s=bad)
    assert "timeout_s" in exc.value.message_dict
    if bad not in (604_801, None):  # None at create: the template's
        with pytest.raises(ValidationError):
            commands.create(caller, name="other", template="linux-small", timeout_s=bad)
    assert vm_events() == events


def test_the_maximum_is_a_setting(caller_for, settings) -> None:
    settings.SANDBOX_VM_LIFETIME_MAX_S = 60
    caller = caller_for("operator")
    with pytest.raises(ValidationError, match="0 \\(no lifetime\\) to 60 seconds"):
        commands.create(caller, name="x", template="linux-small", timeout_s=61)
    vm = running_vm(caller)
    assert commands.set_lifetime(caller, vm, timeout_s=60).data["timeout_s"] == 60


def test_the_owner_extends_and_clears_it(caller_for) -> None:
    caller = caller_for("operator")
    vm = running_vm(caller, timeout_s=60)
    first = vm.expires_at
    extended = commands.set_lifetime(caller, vm, timeout_s=3600)
    vm.refresh_from_db()
    assert vm.expires_at == datetime.fromisoformat(extended.data["expires_at"]) > first
    assert extended.actor_name == caller.user.username
    commands.set_lifetime(caller, vm, timeout_s=0)
    vm.refresh_from_db()
    assert vm.expires_at is None
    cleared = Event.objects.filter(type="vm.lifetime_set").order_by("-position").first()
    assert cleared.payload == {"timeout_s": 0, "expires_at": None, "on_expiry": "stop"}


def test_a_viewer_cannot_set_a_lifetime_and_an_operator_only_on_their_own(caller_for) -> None:
    owner = caller_for("operator")
    vm = running_vm(owner)
    events = vm_events()
    for stranger in (caller_for("viewer"), caller_for("operator")):
        with pytest.raises(PermissionDenied):
            commands.set_lifetime(stranger, vm, timeout_s=60)
    assert vm_events() == events
    admin = caller_for("admin")
    commands.set_lifetime(admin, vm, timeout_s=60)
    assert vm_events() == events + 1


def test_a_destroyed_vm_gets_no_lifetime(caller_for) -> None:
    caller = caller_for("operator")
    vm = running_vm(caller, timeout_s=60)
    destroy = commands.destroy(caller, vm)
    commands.record_outcome(destroy.request, "vm.destroyed", {})
    vm.refresh_from_db()
    assert vm.expires_at is None  # nothing left to end
    with pytest.raises(commands.InvalidState, match="cannot set_lifetime a VM that is destroyed"):
        commands.set_lifetime(caller, vm, timeout_s=60)


# --- The API ----------------------------------------------------------------------------------------


def test_the_api_sets_it_at_create_and_later(make_user, token_client) -> None:
    owner = make_user("operator")
    client = token_client(owner)
    made = client.post(
        "/api/v1/vms/", {"name": "api-box", "template": "linux-small", "timeout_s": 300}, "json"
    )
    assert made.status_code == 202, made.content
    vm = VirtualMachine.objects.get(name="api-box")
    shown = client.get(f"/api/v1/vms/{vm.pk}/").json()
    assert shown["expires_at"] is not None and shown["on_expiry"] == "stop"
    answer = client.post(f"/api/v1/vms/{vm.pk}/lifetime/", {"timeout_s": 900}, "json")
    assert answer.status_code == 200, answer.content
    body = answer.json()
    assert (body["timeout_s"], body["on_expiry"]) == (900, "stop")
    event = Event.objects.get(position=body["event_position"])
    assert event.type == "vm.lifetime_set" and event.payload["expires_at"] == body["expires_at"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "This field is required."),
        ({"timeout_s": "soon"}, "A valid integer is required."),
        ({"timeout_s": -5}, "Ensure this value is greater than or equal to 0."),
        ({"timeout_s": 604_801}, "0 (no lifetime) to 604800 seconds"),
    ],
)
def test_the_api_answers_a_bad_lifetime_with_a_clear_400(
    make_user, token_client, caller_for, body, message
) -> None:
    owner = make_user("operator")
    from accounts.caller import Caller

    vm = running_vm(Caller.for_user(owner, channel="api"))
    events = vm_events()
    answer = token_client(owner).post(f"/api/v1/vms/{vm.pk}/lifetime/", body, "json")
    assert answer.status_code == 400, answer.content
    assert message in str(answer.json()["timeout_s"])
    assert vm_events() == events
    made = token_client(owner).post(
        "/api/v1/vms/", {"name": "n", "template": "linux-small", **body}, "json"
    )
    if body:
        assert made.status_code == 400 and "timeout_s" in made.json(), made.content


def test_the_api_refuses_a_viewer_and_hides_anothers_vm(make_user, token_client) -> None:
    from accounts.caller import Caller

    owner = make_user("operator")
    vm = running_vm(Caller.for_user(owner, channel="api"))
    url = f"/api/v1/vms/{vm.pk}/lifetime/"
    assert token_client(make_user("viewer")).post(url, {"timeout_s": 60}, "json").status_code == 403
    assert (
        token_client(make_user("operator")).post(url, {"timeout_s": 60}, "json").status_code == 404
    )
    assert not Event.objects.filter(type="vm.lifetime_set").exists()


# --- Its end ---------------------------------------------------------------------------------------


def test_an_ended_lifetime_is_stopped_once_by_the_system_with_the_reason(caller_for) -> None:
    caller = caller_for("operator")
    vm = running_vm(caller, timeout_s=30)
    ends = vm.expires_at
    assert lifetimes.expire(later(29)) == 0  # not yet
    assert lifetimes.expire(later(31)) == 1
    assert lifetimes.expire(later(32)) == 0  # asked once, not twice
    stops = Event.objects.filter(type="vm.stop_requested", aggregate_id=str(vm.pk))
    assert stops.count() == 1
    stop = stops.get()
    assert stop.payload["reason"] == "lifetime"
    assert datetime.fromisoformat(stop.payload["expired_at"]) == ends
    assert (stop.actor_type, stop.actor_name) == ("system", "lifetime")
    vm.refresh_from_db()
    assert (vm.state, vm.expires_at) == ("stopping", None)


def test_an_unended_or_absent_lifetime_is_left_alone(caller_for) -> None:
    caller = caller_for("operator")
    running_vm(caller, name="later", timeout_s=3600)
    running_vm(caller, name="never")
    assert lifetimes.due(later(60)) == []
    assert lifetimes.expire(later(60)) == 0
    assert not Event.objects.filter(type__in=["vm.stop_requested", "vm.destroy_requested"]).exists()


def test_a_template_that_says_destroy_gets_a_destroy(caller_for) -> None:
    Template.objects.filter(name="linux-small").update(on_expiry="destroy")
    caller = caller_for("operator")
    vm = running_vm(caller, timeout_s=10)
    assert lifetimes.expire(later(11)) == 1
    destroy = Event.objects.get(type="vm.destroy_requested", aggregate_id=str(vm.pk))
    assert destroy.payload["reason"] == "lifetime"
    assert not Event.objects.filter(type="vm.stop_requested").exists()
    vm.refresh_from_db()
    assert vm.state == "destroying"


def test_a_destroy_overtakes_a_busy_vm_and_a_stop_waits_for_it(caller_for) -> None:
    caller = caller_for("operator")
    waits = running_vm(caller, name="waits", timeout_s=10)
    paused = commands.pause(caller, waits)  # busy until its outcome
    assert lifetimes.expire(later(11)) == 0
    commands.record_outcome(paused.request, "vm.paused", {})
    assert lifetimes.expire(later(12)) == 1
    assert Event.objects.get(type="vm.stop_requested").payload["reason"] == "lifetime"
    Template.objects.filter(name="linux-small").update(on_expiry="destroy")
    goes = running_vm(caller, name="goes", timeout_s=10)
    commands.pause(caller, goes)
    assert lifetimes.expire(later(11)) == 1
    assert Event.objects.get(type="vm.destroy_requested").aggregate_id == str(goes.pk)
    # One whose owner asked its destroy already gets no second one.
    gone = running_vm(caller, name="gone", timeout_s=10)
    commands.destroy(caller, gone)
    assert lifetimes.expire(later(11)) == 0
    assert Event.objects.filter(type="vm.destroy_requested").count() == 2


def test_a_stopped_vm_whose_lifetime_ends_has_it_cleared_and_the_log_says_why(caller_for) -> None:
    caller = caller_for("operator")
    vm = running_vm(caller, timeout_s=10)
    stop = commands.stop(caller, vm)
    commands.record_outcome(stop.request, "vm.stopped", {})
    assert lifetimes.expire(later(11)) == 1
    assert lifetimes.expire(later(12)) == 0
    cleared = Event.objects.filter(type="vm.lifetime_set").order_by("-position").first()
    assert cleared.payload["reason"] == "lifetime" and cleared.payload["expires_at"] is None
    assert cleared.actor_name == "lifetime"
    assert Event.objects.filter(type="vm.stop_requested").count() == 1  # the owner's only
    vm.refresh_from_db()
    assert (vm.state, vm.expires_at) == ("stopped", None)


def test_the_tick_enqueues_a_run_only_when_a_lifetime_has_ended(caller_for, monkeypatch) -> None:
    import django_q.tasks

    runs: list[str] = []
    monkeypatch.setattr(django_q.tasks, "async_task", lambda func, **kw: runs.append(func))
    monkeypatch.setattr(lifetimes, "_enqueued_at", None)
    caller = caller_for("operator")
    running_vm(caller, timeout_s=10)
    lifetimes.tick(later(5))
    assert runs == []
    lifetimes.tick(later(11))
    lifetimes.tick(later(12))  # one run may still be waiting: not another
    assert runs == ["vms.tasks.expire_lifetimes"]


def test_a_rebuild_gives_the_same_lifetimes(caller_for) -> None:
    caller = caller_for("operator")
    kept = running_vm(caller, name="kept", timeout_s=600)
    ended = running_vm(caller, name="ended", timeout_s=10)
    lifetimes.expire(later(11))
    before = dict(VirtualMachine.objects.values_list("name", "expires_at"))
    assert before == {"kept": kept.expires_at, "ended": None}
    projections.rebuild("vms.state")
    assert dict(VirtualMachine.objects.values_list("name", "expires_at")) == before
    assert ended.pk


# --- The dashboard and the templates file -----------------------------------------------------------


def test_the_dashboards_create_form_gives_a_lifetime_and_refuses_a_bad_one(make_user) -> None:
    from django.test import Client

    page = Client()
    page.force_login(make_user("operator"))
    assert "Lifetime (seconds)" in page.get("/vms/new/").content.decode()
    made = page.post("/vms/new/", {"name": "timed", "template": "linux-small", "timeout_s": 90})
    assert made.status_code == 302, made.content
    vm = VirtualMachine.objects.get(name="timed")
    assert (
        Event.objects.get(type="vm.lifetime_set", aggregate_id=str(vm.pk)).payload["timeout_s"]
        == 90
    )
    refused = page.post(
        "/vms/new/", {"name": "too-long", "template": "linux-small", "timeout_s": 604_801}
    )
    assert refused.status_code == 200
    assert "0 (no lifetime) to 604800 seconds" in refused.content.decode()
    assert not VirtualMachine.objects.filter(name="too-long").exists()


def test_a_templates_file_gives_lifetimes_and_refuses_bad_ones(tmp_path, settings) -> None:
    from django.core.exceptions import ImproperlyConfigured

    from vms import templates_config

    path = tmp_path / "templates.yaml"
    path.write_text(
        "templates:\n"
        "  - {name: brief, boot: linux, vcpus: 1, memory_mib: 256, timeout_s: 600,"
        " on_expiry: destroy}\n"
    )
    settings.SANDBOX_TEMPLATES_FILE = str(path)
    templates_config.sync_templates()
    brief = Template.objects.get(name="brief")
    assert (brief.timeout_s, brief.on_expiry) == (600, "destroy")
    assert Template.objects.get(name="linux-small").timeout_s is None
    for bad, message in (
        ("timeout_s: 0", "timeout_s must be 1 to"),
        ("timeout_s: '60'", "timeout_s must be 1 to"),
        ("on_expiry: pause", "on_expiry must be stop or destroy"),
    ):
        path.write_text(
            f"templates:\n  - {{name: bad, boot: linux, vcpus: 1, memory_mib: 256, {bad}}}\n"
        )
        with pytest.raises(ImproperlyConfigured, match=message):
            templates_config.load_yaml(path)


def test_the_vm_page_says_when_its_lifetime_ends_and_what_then(caller_for) -> None:
    from django.test import Client

    caller = caller_for("operator")
    vm = running_vm(caller, timeout_s=600)
    page = Client()
    page.force_login(caller.user)
    html = page.get(f"/vms/{vm.pk}/").content.decode()
    assert "<dt>Lifetime</dt><dd>ends " in html and ", then stop</dd>" in html
    commands.set_lifetime(caller, vm, timeout_s=0)
    assert "<dt>Lifetime</dt><dd>none</dd>" in page.get(f"/vms/{vm.pk}/").content.decode()


# --- A failed end, clones, the page's form ------------------------------------------------------------


def test_a_failed_lifetime_stop_is_asked_again_later_not_forgotten(caller_for, monkeypatch) -> None:
    """The stop a lifetime's end asked fails in the worker: its failure carries when to ask again,
    the VM's end becomes that time, and the next run past it asks the stop again."""
    from vms import worker

    def failing_stop(vm: Any, request: Any) -> Any:
        raise worker.RequestFailed("the guest ignored its shutdown", state="running")

    monkeypatch.setitem(worker.HANDLERS, "stop", failing_stop)
    caller = caller_for("operator")
    vm = running_vm(caller, timeout_s=10)
    assert lifetimes.expire(later(11)) == 1
    stop = Event.objects.get(type="vm.stop_requested", aggregate_id=str(vm.pk))
    before = timezone.now()
    assert worker.handle(str(stop.event_id)).startswith("failed")
    failed = Event.objects.get(type="vm.stop_failed", aggregate_id=str(vm.pk))
    retry_at = datetime.fromisoformat(failed.payload["lifetime_retry_at"])
    assert before + timedelta(seconds=60) <= retry_at <= timezone.now() + timedelta(seconds=60)
    vm.refresh_from_db()
    assert (vm.state, vm.expires_at) == ("running", retry_at)
    assert lifetimes.expire(retry_at - timedelta(seconds=1)) == 0
    assert lifetimes.expire(retry_at + timedelta(seconds=1)) == 1
    assert Event.objects.filter(type="vm.stop_requested", aggregate_id=str(vm.pk)).count() == 2
    # The rebuild from the log gives the same end.
    vm.refresh_from_db()
    ends = vm.expires_at
    projections.rebuild("vms.state")
    vm.refresh_from_db()
    assert vm.expires_at == ends


def test_an_owners_failed_stop_does_not_give_a_lifetime(caller_for, monkeypatch) -> None:
    from vms import worker

    monkeypatch.setitem(
        worker.HANDLERS,
        "stop",
        lambda vm, request: (_ for _ in ()).throw(worker.RequestFailed("no", state="running")),
    )
    caller = caller_for("operator")
    vm = running_vm(caller)
    stop = commands.stop(caller, vm)
    worker.handle(str(stop.request.event_id))
    failed = Event.objects.get(type="vm.stop_failed", aggregate_id=str(vm.pk))
    assert "lifetime_retry_at" not in failed.payload
    vm.refresh_from_db()
    assert vm.expires_at is None


def _snapshot_of(caller: Any, vm: VirtualMachine, kept_image: str) -> Any:
    from audit import store
    from audit.actor import Actor
    from vms.models import Snapshot

    taken = commands.snapshot(caller, vm, name="s1")
    commands.record_outcome(
        taken.request, "vm.snapshotted", {"snapshot_id": str(taken.snapshot.pk)}
    )
    store.append(
        "snapshot",
        str(taken.snapshot.pk),
        "snapshot.created",
        {
            "manifest": {"state.bin": {"size": 1, "sha256": "0" * 64}},
            "size_bytes": 1,
            "image_id": kept_image,
        },
        actor=Actor.system(),
        expected_version=0,
    )
    return Snapshot.objects.get(pk=taken.snapshot.pk)


def test_a_clone_takes_its_templates_lifetime_or_the_one_asked(caller_for, kept_image) -> None:
    Template.objects.filter(name="linux-small").update(timeout_s=600, on_expiry="destroy")
    caller = caller_for("operator")
    vm = running_vm(caller)
    snap = _snapshot_of(caller, vm, kept_image)
    by_template = commands.clone(caller, snap, name="c1").vm
    asked = commands.clone(caller, snap, name="c2", timeout_s=60).vm
    none = commands.clone(caller, snap, name="c3", timeout_s=0).vm
    for clone, seconds in ((by_template, 600), (asked, 60)):
        clone.refresh_from_db()
        assert clone.on_expiry == "destroy"
        assert later(seconds - 5) < clone.expires_at <= later(seconds)
        assert types_of(clone.pk)[-2:] == ["vm.lifetime_set", "vm.restore_requested"]
    none.refresh_from_db()
    assert none.expires_at is None and "vm.lifetime_set" not in types_of(none.pk)
    with pytest.raises(ValidationError):
        commands.clone(caller, snap, name="c4", timeout_s=-1)
    assert not VirtualMachine.objects.filter(name="c4").exists()


def test_the_api_clones_with_a_lifetime_and_refuses_a_bad_one(
    make_user, token_client, kept_image
) -> None:
    from accounts.caller import Caller

    user = make_user("operator")
    client = token_client(user)
    vm = running_vm(Caller.for_user(user))
    snap = _snapshot_of(Caller.for_user(user), vm, kept_image)
    made = client.post(
        f"/api/v1/snapshots/{snap.pk}/clone/", {"name": "timed", "timeout_s": 120}, format="json"
    )
    assert made.status_code == 202, made.content
    timed = VirtualMachine.objects.get(name="timed")
    assert later(115) < timed.expires_at <= later(120)
    bad = client.post(
        f"/api/v1/snapshots/{snap.pk}/clone/", {"name": "bad", "timeout_s": "soon"}, format="json"
    )
    assert bad.status_code == 400 and "timeout_s" in bad.json(), bad.content
    assert not VirtualMachine.objects.filter(name="bad").exists()


def test_the_vm_pages_form_sets_extends_and_clears_the_lifetime(caller_for, make_user) -> None:
    from django.test import Client

    caller = caller_for("operator")
    vm = running_vm(caller)
    page = Client()
    page.force_login(caller.user)
    assert 'id="vm-lifetime"' in page.get(f"/vms/{vm.pk}/").content.decode()
    done = page.post(f"/vms/{vm.pk}/lifetime/", {"timeout_s": 300}, follow=True)
    assert "Lifetime set: ends" in done.content.decode()
    vm.refresh_from_db()
    assert later(295) < vm.expires_at <= later(300)
    refused = page.post(f"/vms/{vm.pk}/lifetime/", {"timeout_s": "-3"}, follow=True)
    assert "Lifetime refused" in refused.content.decode()
    vm.refresh_from_db()
    assert vm.expires_at is not None  # unchanged
    page.post(f"/vms/{vm.pk}/lifetime/", {"timeout_s": 0})
    vm.refresh_from_db()
    assert vm.expires_at is None
    assert Event.objects.filter(type="vm.lifetime_set", aggregate_id=str(vm.pk)).count() == 2
    # A viewer sees no form and is refused; the lifetime stays as it was.
    viewer = Client()
    viewer.force_login(make_user("viewer"))
    assert 'id="vm-lifetime"' not in viewer.get(f"/vms/{vm.pk}/").content.decode()
    answer = viewer.post(f"/vms/{vm.pk}/lifetime/", {"timeout_s": 30}, follow=True)
    assert answer.status_code in (403, 404) or "Lifetime refused" in answer.content.decode()
    assert Event.objects.filter(type="vm.lifetime_set", aggregate_id=str(vm.pk)).count() == 2
