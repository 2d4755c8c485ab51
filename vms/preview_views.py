"""Dashboard side of preview URLs: open a guest's port, or make a shareable link to it.

Opening redirects to the preview host with a hand-off grant good for a minute
(``SANDBOX_PREVIEW_HANDOFF_S``), which the preview host exchanges for its own cookie: the
dashboard's session cookie never has to reach the preview host, and is never accepted there.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from accounts.caller import Caller
from vms import commands, lifecycle, policy, previews
from vms.models import PreviewLink, VirtualMachine
from vms.preview_api import link_url

__all__ = ["open_links", "vm_preview", "vm_preview_open", "vm_preview_revoke"]


def _vm(request: HttpRequest, pk: Any) -> VirtualMachine:
    if not settings.SANDBOX_PREVIEW_DOMAIN:
        raise Http404("previews are turned off")
    caller = Caller.from_request(request)
    vm = policy.visible_vms(caller).filter(pk=pk).exclude(state=lifecycle.GONE).first()
    if vm is None:
        raise Http404("no such VM")  # another operator's VM looks exactly like a missing one
    return vm


def _port(raw: Any) -> int:
    try:
        port = int(raw)
    except (TypeError, ValueError):
        raise Http404("no such port") from None
    if not previews.port_allowed(port):
        raise PermissionDenied("this port may not be previewed")
    return port


@require_GET
@login_required
def vm_preview_open(request: HttpRequest, pk: Any, port: int) -> HttpResponse:
    """To the preview host of ``port``, as the signed-in user (who may see the VM)."""
    vm = _vm(request, pk)
    user_id = request.user.pk
    assert user_id is not None  # login_required
    grant = previews.issue(
        vm, _port(port), user_id, previews.HANDOFF, settings.SANDBOX_PREVIEW_HANDOFF_S
    )
    response = HttpResponseRedirect(link_url(request, grant))
    response["Cache-Control"] = "no-store"
    return response


@require_http_methods(["GET", "POST"])
@login_required
def vm_preview(request: HttpRequest, pk: Any) -> HttpResponse:
    """The detail page's preview box: GET ?port= opens it, POST makes a shareable link."""
    vm = _vm(request, pk)
    if request.method == "GET":
        return redirect("vms:preview-open", pk=vm.pk, port=_port(request.GET.get("port")))
    try:
        seconds = int(request.POST.get("expires_in") or settings.SANDBOX_PREVIEW_LINK_DEFAULT_S)
        grant = commands.create_preview_link(
            Caller.from_request(request), vm, _port(request.POST.get("port")), seconds
        )
    except (ValueError, ValidationError, PermissionDenied) as exc:
        messages.error(request, f"No link made: {exc}")
    else:
        url = link_url(request, grant)
        messages.success(request, f"Shareable link to port {grant.port} ({seconds} s): {url}")
    return redirect("vms:detail", pk=vm.pk)


def open_links(vm: VirtualMachine) -> list[PreviewLink]:
    """The VM's shareable links that still open (not revoked, not expired), for its page."""
    links = PreviewLink.objects.filter(
        vm_id=vm.pk, revoked_at__isnull=True, expires_at__gt=timezone.now()
    )
    return list(links[:50])


@require_POST
@login_required
def vm_preview_revoke(request: HttpRequest, pk: Any) -> HttpResponse:
    """Revoke one shareable link (``link_id``), or every open one (no ``link_id``)."""
    vm = _vm(request, pk)
    link_id = request.POST.get("link_id") or None
    try:
        ids = commands.revoke_preview_links(Caller.from_request(request), vm, link_id)
    except commands.NotFound:
        messages.error(request, "No such preview link.")
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, f"Nothing revoked: {exc}")
    else:
        if ids:
            messages.success(request, f"Revoked {len(ids)} preview link(s): {', '.join(ids)}")
        else:
            messages.info(request, "No open preview link to revoke.")
    return redirect("vms:detail", pk=vm.pk)
