"""The auditor area's console sessions (Django test client): each session names its VM (the id
beside it), destroyed VMs included, and its watcher by role, not by access mode."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db


def client_for(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def session(user: Any, vm: Any, name: str, mode: str = "read") -> Any:
    """A console session of ``user`` on ``vm`` as the consumer records it; the closing event."""
    from vms import console

    actor = console.session_actor(user, {"client": ("127.0.0.1", 1)})
    opened = console.record_opened(
        actor, str(vm.pk), session=name, mode=mode, recording=f"{name}.cast", cols=80, rows=24
    )
    return console.record_closed(
        actor,
        str(vm.pk),
        session=name,
        opened_event_id=opened.event_id,
        recording=f"{name}.cast",
        size=0,
        sha256="",
        duration_s=1.0,
        input_bytes=0,
        output_bytes=0,
        ignored_input_bytes=0,
    )


def rows(html: str) -> list[str]:
    body = html[html.index('id="console-sessions"') :]
    return [re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", r)) for r in body.split("<tr>")[2:]]


def test_sessions_name_their_vm_with_the_id_beside_it(make_user, make_vm) -> None:
    olga = make_user("operator", "olga")
    vm = make_vm(olga, "web-frontend")
    session(olga, vm, "s1", mode="write")
    page = client_for(make_user("auditor", "aud")).get("/audit/sessions/").content.decode()
    (closed, opened) = rows(page)
    assert "web-frontend" in closed and str(vm.pk) in closed
    assert f'href="/vms/{vm.pk}/"' in page
    assert f"aggregate_id={vm.pk}" in page


def test_a_destroyed_vm_keeps_its_name(make_user, make_vm) -> None:
    from vms.models import VirtualMachine, VMState

    olga = make_user("operator", "olga")
    gone = make_vm(olga, "old-db")
    session(olga, gone, "s1", mode="write")
    VirtualMachine.objects.filter(pk=gone.pk).update(state=VMState.DESTROYED)
    unknown = make_vm(olga, "scratch")
    session(olga, unknown, "s2", mode="write")
    # A VM with no row left (a projection rebuilt without it): its name from vm.created.
    VirtualMachine.objects.filter(pk=unknown.pk).delete()
    auditor = client_for(make_user("auditor", "aud"))
    page = auditor.get("/audit/sessions/").content.decode()
    text = " ".join(rows(page))
    assert "old-db (destroyed)" in text and "scratch (destroyed)" in text
    assert f'href="/vms/{unknown.pk}/"' not in page


def test_an_auditors_watch_session_is_labelled_auditor(make_user, make_vm) -> None:
    from audit.models import Event

    olga = make_user("operator", "olga")
    vm = make_vm(olga, "web")
    audrey = make_user("auditor", "audrey")
    closed = session(audrey, vm, "s1", mode="read")
    opened = Event.objects.get(type="vm.console_opened")
    assert opened.payload["role"] == "auditor" and opened.payload["mode"] == "viewer"
    auditor = client_for(make_user("auditor", "aud"))
    page = auditor.get("/audit/sessions/").content.decode()
    (row_closed, row_opened) = rows(page)
    for row in (row_closed, row_opened):
        assert "audrey auditor watched" in row and "viewer" not in row
    replay = auditor.get(f"/audit/sessions/{closed.position}/replay/").content.decode()
    assert re.search(r"audrey\s*<span class=\"badge role\">auditor</span> · watched", replay)
    assert "web" in replay


def test_a_session_recorded_without_a_role_takes_its_actors(make_user, make_vm) -> None:
    """Sessions recorded before the opening event named the role: the actor's role now."""
    from vms import commands, console

    olga = make_user("operator", "olga")
    vm = make_vm(olga, "web")
    vera = make_user("viewer", "vera")
    actor = console.session_actor(vera, {"client": ("127.0.0.1", 1)})
    commands.record_console_opened(actor, str(vm.pk), {"session": "old", "mode": "viewer"})
    page = client_for(make_user("auditor", "aud")).get("/audit/sessions/").content.decode()
    (row,) = rows(page)
    assert "vera viewer watched" in row
