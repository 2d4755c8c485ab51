"""The dashboard's home page, and the favicon at the address browsers ask for."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from accounts.caller import Caller
from audit.commands import read_details, record_trail_read
from audit.models import Event
from vms import tasklog
from vms.task_views import record_read

RUNNING_ROWS = 10


@login_required
def home(request: HttpRequest) -> HttpResponse:
    user = request.user
    if user.has_perm("audit.view_audit_trail"):
        events = Event.objects.order_by("-position")[:25]
    else:
        events = Event.objects.filter(actor_id=str(user.pk)).order_by("-position")[:25]
    events = list(events)
    # Showing events is reading the trail: one audit.trail_read per page view.
    record_trail_read(request, "dashboard.home", read_details({}, events))
    # What is running now: the pending tasks on the VMs the user sees (the task log's panel).
    filters = tasklog.Filters(state="pending")
    running, _ = tasklog.page(Caller.from_request(request), filters, size=RUNNING_ROWS)
    record_read(request, "dashboard.home_tasks", filters, running)
    return render(request, "home.html", {"events": events, "running": running})


_FAVICON = settings.BASE_DIR / "static" / "favicon.svg"


def favicon(request: HttpRequest) -> HttpResponse:
    """/favicon.ico, which browsers and tools ask for whatever the page links: the SVG icon."""
    response = HttpResponse(_FAVICON.read_bytes(), content_type="image/svg+xml")
    response["Cache-Control"] = "public, max-age=86400"
    return response
