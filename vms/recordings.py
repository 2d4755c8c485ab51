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
from pathlib import Path
from typing import Any

from django.contrib.auth.decorators import login_required, permission_required
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render
from django.views.decorators.http import require_GET

from audit import bundle, commands, sections
from audit.bundle import Attachment
from audit.models import Event
from audit.sections import Section
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


@require_GET
@_needs_view
def sessions(request: HttpRequest) -> HttpResponse:
    """Every console session's opening and closing events, newest first."""
    events = Event.objects.filter(type__in=[OPENED, CLOSED]).order_by("-position")
    page = Paginator(events, PAGE_SIZE).get_page(request.GET.get("page"))
    commands.record_trail_read(
        request,
        "dashboard.sessions",
        commands.read_details({"page": page.number}, page.object_list),
    )
    return render(request, "vms/sessions.html", {"page": page, "section": "sessions"})


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
    vm = VirtualMachine.objects.filter(pk=closed.aggregate_id).only("name").first()
    commands.record_trail_read(request, "dashboard.session_replay", {"position": position})
    return render(
        request,
        "vms/replay.html",
        {
            "closed": closed,
            "opened": opened,
            "opened_mode": opened.payload.get("mode") if opened else "",
            "data": data,
            "session": data.get("session", ""),
            "vm_name": vm.name if vm else "",
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
