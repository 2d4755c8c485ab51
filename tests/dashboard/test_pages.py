"""The dashboard's server-rendered pages: navigation per role, list, create (with quotas), a VM's
page and its actions, user admin, console replays. No guest needed."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _urls(settings: Any) -> None:
    settings.ROOT_URLCONF = "tests.dashboard.urls"


def client_for(user: Any) -> Client:
    c = Client()
    c.force_login(user)
    return c


def nav(html: str) -> set[str]:
    names = ("nav-vms", "nav-new-vm", "nav-networks", "nav-users")
    return {name for name in names if f'id="{name}"' in html}


def test_navigation_shows_each_role_what_it_may_do(make_user) -> None:
    pages = {
        role: client_for(make_user(role)).get("/").content.decode()
        for role in ("admin", "operator", "viewer", "auditor")
    }
    assert nav(pages["admin"]) == {"nav-vms", "nav-new-vm", "nav-networks", "nav-users"}
    assert nav(pages["operator"]) == {"nav-vms", "nav-new-vm", "nav-networks"}
    assert nav(pages["viewer"]) == {"nav-vms", "nav-networks"}
    assert nav(pages["auditor"]) == {"nav-vms", "nav-networks"}
    assert "/audit/" in pages["auditor"] and "/audit/" not in pages["operator"]


def test_list_shows_own_vms_and_filters(make_user, make_vm) -> None:
    alice, bob = make_user("operator"), make_user("operator")
    make_vm(alice, "web-1"), make_vm(alice, "db-1"), make_vm(bob, "bobs")
    page = client_for(alice).get("/vms/").content.decode()
    assert "web-1" in page and "db-1" in page and "bobs" not in page
    searched = client_for(alice).get("/vms/?q=web").content.decode()
    assert "web-1" in searched and "db-1" not in searched
    everyone = client_for(make_user("viewer")).get("/vms/").content.decode()
    assert all(n in everyone for n in ("web-1", "db-1", "bobs"))
    assert client_for(alice).get("/vms/?state=running").content.decode().count("data-vm-id=") == 0


def test_create_calls_the_command_and_rejects_what_exceeds_the_quota(make_user) -> None:
    from vms.models import Quota, VirtualMachine

    alice = make_user("operator")
    c = client_for(alice)
    form = c.get("/vms/new/").content.decode()
    assert 'data-resource="vms"' in form and "linux-small" in form
    created = c.post("/vms/new/", {"name": "first", "template": "linux-small", "start": ""})
    vm = VirtualMachine.objects.get(name="first")
    assert created.status_code == 302 and created["Location"] == f"/vms/{vm.pk}/"
    assert vm.state == "stopped"

    Quota.objects.create(user=alice, max_vms=5, max_vcpus=1)
    refused = c.post("/vms/new/", {"name": "big", "template": "linux-small", "vcpus": 2})
    assert refused.status_code == 200
    assert "Over quota" in refused.content.decode() and "vcpus" in refused.content.decode()
    assert not VirtualMachine.objects.filter(name="big").exists()
    bad = c.post("/vms/new/", {"name": "no spaces", "template": "linux-small"})
    assert "letters, digits" in bad.content.decode()
    assert client_for(make_user("viewer")).get("/vms/new/").status_code == 403


def test_vm_page_and_actions(make_user, make_vm) -> None:
    alice = make_user("operator")
    vm = make_vm(alice, "box")
    c = client_for(alice)
    page = c.get(f"/vms/{vm.pk}/").content.decode()
    for needle in (
        'data-verb="start"',
        'data-verb="snapshot"',
        'data-verb="destroy"',
        "vm.created",
        'id="exec-form"',
        "/console/",
    ):
        assert needle in page, needle
    # A refused action is shown where it happened, and nothing is appended.
    refused = c.post(f"/vms/{vm.pk}/pause/", follow=True).content.decode()
    assert "Pause refused: cannot pause a VM that is stopped" in refused
    accepted = c.post(f"/vms/{vm.pk}/start/", follow=True).content.decode()
    assert "Start requested." in accepted and "vm.start_requested" in accepted
    busy = c.post(f"/vms/{vm.pk}/reboot/", follow=True).content.decode()
    assert "Reboot refused" in busy
    # Others: another operator gets 404s, a viewer reads without action forms.
    other = client_for(make_user("operator"))
    assert other.get(f"/vms/{vm.pk}/").status_code == 404
    assert other.post(f"/vms/{vm.pk}/destroy/").status_code == 404
    viewer_page = client_for(make_user("viewer")).get(f"/vms/{vm.pk}/").content.decode()
    assert 'data-verb="start"' not in viewer_page and "(watch)" in viewer_page
    watch = client_for(make_user("viewer")).get(f"/vms/{vm.pk}/console/").content.decode()
    assert 'data-mode="read"' in watch
    assert 'data-mode="write"' in c.get(f"/vms/{vm.pk}/console/").content.decode()


def test_user_admin(make_user) -> None:
    from accounts.models import User

    admin = make_user("admin")
    c = client_for(admin)
    assert c.get("/accounts/users/").status_code == 200
    made = c.post(
        "/accounts/users/",
        {"username": "carol", "role": "viewer", "password": "a-Long-pass-phrase-9"},
    )
    assert made.status_code == 302
    carol = User.objects.get(username="carol")
    assert carol.role == "viewer"
    c.post(f"/accounts/users/{carol.pk}/role/", {"role": "operator"})
    c.post(f"/accounts/users/{carol.pk}/active/", {"active": "0"})
    carol.refresh_from_db()
    assert carol.role == "operator" and not carol.is_active
    own = c.post(
        f"/accounts/users/{admin.pk}/role/", {"role": "viewer"}, follow=True
    ).content.decode()
    assert "cannot change your own role" in own
    assert client_for(make_user("operator")).get("/accounts/users/").status_code == 403
    assert client_for(make_user("operator")).get("/accounts/tokens/").status_code == 200


def test_console_replay_checks_the_recording(make_user, make_vm, settings, tmp_path) -> None:
    from audit.models import Event
    from vms import console

    settings.SANDBOX_CONSOLE_DIR = tmp_path
    alice = make_user("operator")
    vm = make_vm(alice, "rec")
    actor = console.session_actor(alice, {"client": ("127.0.0.1", 1)})
    path, ref = console.new_recording_path(str(vm.pk), "s1")
    rec = console.Recording(path, cols=80, rows=24, title="t", record_input=True)
    rec.output(b"# ")
    rec.input(b"ls\r")
    rec.output(b"ls\r\nbin etc\r\n")
    rec._write(final=True)
    opened = console.record_opened(
        actor, str(vm.pk), session="s1", mode="write", recording=ref, cols=80, rows=24
    )
    closed = console.record_closed(
        actor,
        str(vm.pk),
        session="s1",
        opened_event_id=opened.event_id,
        recording=ref,
        size=rec.size,
        sha256=rec.sha256,
        duration_s=rec.duration_s,
        input_bytes=3,
        output_bytes=14,
        ignored_input_bytes=0,
    )
    assert hashlib.sha256(path.read_bytes()).hexdigest() == rec.sha256
    auditor = client_for(make_user("auditor"))
    listing = auditor.get("/audit/sessions/").content.decode()
    assert f"/audit/sessions/{closed.position}/replay/" in listing
    page = auditor.get(f"/audit/sessions/{closed.position}/replay/").content.decode()
    assert "matches the event" in page and "operator" in page
    cast = auditor.get(f"/audit/sessions/{closed.position}/cast")
    lines = b"".join(cast.streaming_content).decode().splitlines()
    assert json.loads(lines[0])["version"] == 2
    assert [json.loads(x)[1] for x in lines[1:]] == ["o", "i", "o"]
    assert client_for(alice).get(f"/audit/sessions/{closed.position}/replay/").status_code == 403
    path.write_bytes(path.read_bytes().replace(b"bin etc", b"bin XXX"))
    tampered = auditor.get(f"/audit/sessions/{closed.position}/replay/").content.decode()
    assert "does NOT match" in tampered
    assert auditor.get(f"/audit/sessions/{closed.position}/cast").status_code == 404
    assert Event.objects.filter(type="vm.console_closed").count() == 1


def test_metrics_endpoint_has_vm_families(make_user) -> None:
    body = Client().get("/metrics").content.decode()
    assert "sandbox_event_store_head_position" in body
