"""Console sessions in the auditor area: list them, replay one, fetch its asciicast.

Each console session is recorded to a file (``vms.console``) that its ``vm.console_closed``
event names with the file's size and SHA-256; these pages check the file against that event
before they play or hand it out. Mounted under ``/audit/sessions/`` by the site
(``vms.urls_recordings``) and linked from the auditor area's navigation through
``audit.sections`` (``SECTION``, registered by ``vms.apps``); like every page of that area they
need ``audit.view_audit_trail``. Evidence bundles carry the recordings beside their closing
events through ``audit.bundle.register_attachment`` (``ATTACHMENT``, registered the same way).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.contrib.auth.decorators import login_required, permission_required
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render
from django.views.decorators.http import require_GET

from accounts import roles
from accounts.models import User
from audit import bundle, commands, sections
from audit.bundle import Attachment
from audit.models import Event
from audit.sections import Section
from vms import lifecycle
from vms.console import resolve_recording
from vms.models import VirtualMachine

__all__ = ["ATTACHMENT", "SECTION", "cast", "replay", "sessions"]

VIEW = "audit.view_audit_trail"
OPENED, CLOSED = "vm.console_opened", "vm.console_closed"
PAGE_SIZE = 50


def _recording_file(data: dict[str, Any]) -> Path | None:
    return resolve_recording(str(data.get("recording", "")))


def _cast_suffix(data: dict[str, Any]) -> str:
    return ".cast"


ATTACHMENT = Attachment(CLOSED, _recording_file, _cast_suffix)
SECTION = Section("sessions", "Console sessions", "recordings:sessions")
# Registered on import (``vms.apps`` imports this module while the apps get ready).
sections.register(SECTION)
bundle.register_attachment(ATTACHMENT)


def _needs_view(view: Any) -> Any:
    return login_required(permission_required(VIEW, raise_exception=True)(view))


def _recording(position: int) -> tuple[Event, dict[str, Any], Path | None, str]:
    """The closing event at ``position``, its data, the recording file, and what is wrong with
    it ("" when its size and SHA-256 match the event)."""
    closed = get_object_or_404(Event, position=position, type=CLOSED)
    data = closed.payload
    path = _recording_file(data)
    if path is None or not path.is_file():
        return closed, data, None, "the recording is not on this server"
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
            size += len(block)
    if (size, digest.hexdigest()) != (data.get("size"), data.get("sha256")):
        return closed, data, path, "the recording does NOT match its event (altered or truncated)"
    return closed, data, path, ""


@dataclass(frozen=True)
class VMName:
    """What a session's VM is called, and whether its page still answers."""

    name: str
    destroyed: bool
    exists: bool


def vm_names(vm_ids: Iterable[str]) -> dict[str, VMName]:
    """The name of each VM: its row's (destroyed VMs keep theirs), else, for an id with no row
    (a projection rebuilt without it, an event from elsewhere), the name its ``vm.created``
    event gave it. An id known to neither is left out."""
    ids = {str(i) for i in vm_ids}
    out: dict[str, VMName] = {}
    valid = []
    for vm_id in ids:
        try:
            valid.append(uuid.UUID(vm_id))
        except ValueError:
            continue
    for pk, name, state in VirtualMachine.objects.filter(pk__in=valid).values_list(
        "pk", "name", "state"
    ):
        out[str(pk)] = VMName(name, state == lifecycle.GONE, True)
    missing = ids - out.keys()
    if missing:
        created = Event.objects.filter(
            aggregate_type="vm", aggregate_id__in=missing, type="vm.created"
        ).only("aggregate_id", "data")
        for event in created:
            out[event.aggregate_id] = VMName(str(event.payload.get("name", "")), True, False)
    return out


def session_roles(events: Iterable[Event]) -> dict[int, str]:
    """Each opening or closing event's watcher role, by position: the role its opening event
    recorded (``role``); for sessions recorded before it did, the role of the event's actor
    now. "" for an actor that is no user (or no longer exists)."""
    events = list(events)
    opened_ids = [e.causation_id for e in events if e.type == CLOSED and e.causation_id]
    opened = {
        str(e.event_id): e.payload
        for e in Event.objects.filter(type=OPENED, event_id__in=opened_ids).only("event_id", "data")
    }
    recorded: dict[int, str] = {}
    for e in events:
        data = e.payload if e.type == OPENED else opened.get(str(e.causation_id), {})
        if data.get("role"):
            recorded[e.position] = str(data["role"])
    user_ids = {
        int(e.actor_id)
        for e in events
        if e.position not in recorded and e.actor_type == "user" and e.actor_id.isdigit()
    }
    current = {
        str(u.pk): roles.role_of(u)
        for u in User.objects.filter(pk__in=user_ids).prefetch_related("groups")
    }
    return {e.position: recorded.get(e.position) or current.get(e.actor_id, "") for e in events}


def _access(mode: str) -> str:
    return "typed" if mode == "operator" else "watched"


@dataclass(frozen=True)
class SessionRow:
    event: Event
    vm: VMName | None
    role: str
    access: str


@require_GET
@_needs_view
def sessions(request: HttpRequest) -> HttpResponse:
    """Every console session's opening and closing events, newest first, each with its VM's
    name and its watcher's role."""
    events = Event.objects.filter(type__in=[OPENED, CLOSED]).order_by("-position")
    page = Paginator(events, PAGE_SIZE).get_page(request.GET.get("page"))
    shown = list(page.object_list)
    names = vm_names(e.aggregate_id for e in shown)
    who = session_roles(shown)
    modes = _modes(shown)
    rows = [
        SessionRow(e, names.get(e.aggregate_id), who.get(e.position, ""), modes.get(e.position, ""))
        for e in shown
    ]
    commands.record_trail_read(
        request,
        "dashboard.sessions",
        commands.read_details({"page": page.number}, shown),
    )
    return render(request, "vms/sessions.html", {"page": page, "rows": rows, "section": "sessions"})


def _modes(events: list[Event]) -> dict[int, str]:
    """Whether each session typed or watched (the opening event's ``mode``)."""
    opened_ids = [e.causation_id for e in events if e.type == CLOSED and e.causation_id]
    opened = {
        str(e.event_id): e.payload
        for e in Event.objects.filter(type=OPENED, event_id__in=opened_ids).only("event_id", "data")
    }
    out = {}
    for e in events:
        data = e.payload if e.type == OPENED else opened.get(str(e.causation_id), {})
        if data.get("mode"):
            out[e.position] = _access(str(data["mode"]))
    return out


@require_GET
@_needs_view
def replay(request: HttpRequest, position: int) -> HttpResponse:
    """Play a console recording back, after checking it against its ``vm.console_closed``."""
    closed, data, _, problem = _recording(position)
    opened = (
        Event.objects.filter(type=OPENED, event_id=closed.causation_id).first()
        if closed.causation_id
        else None
    )
    vm = vm_names([closed.aggregate_id]).get(closed.aggregate_id)
    commands.record_trail_read(request, "dashboard.session_replay", {"position": position})
    return render(
        request,
        "vms/replay.html",
        {
            "closed": closed,
            "opened": opened,
            "access": _access(str(opened.payload.get("mode"))) if opened else "",
            "role": session_roles([closed]).get(closed.position, ""),
            "data": data,
            "session": data.get("session", ""),
            "vm": vm,
            "intact": not problem,
            "problem": problem,
            "section": "sessions",
        },
    )


@require_GET
@_needs_view
def cast(request: HttpRequest, position: int) -> FileResponse:
    """The recording itself (asciicast v2), only when it matches its event."""
    _, data, path, problem = _recording(position)
    if problem or path is None:
        raise Http404(problem)
    commands.record_trail_read(request, "dashboard.session_recording", {"position": position})
    response = FileResponse(path.open("rb"), content_type="application/x-asciicast")
    response["X-Content-SHA256"] = data["sha256"]
    return response
