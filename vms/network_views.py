"""Dashboard page of the networks VMs join: every signed-in user reads the list; administrators
(``vms.policy.NETWORK_PERMISSIONS``) create, change and delete networks.

Views parse the form and call ``vms.commands`` (which check names, subnets, bridges, overlaps and
what may change while VMs are on a network, and append the ``net.network_*`` events); they never
write a network row. Anyone else's POST is a 403 before its input is read. A refused field is
shown on the field with nothing changed; a refused delete as a message with the command's reason.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.db.models import Count, Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from accounts.caller import Caller
from vms import commands, lifecycle, policy
from vms.forms import NetworkForm
from vms.models import Network

__all__ = ["network_delete", "network_edit", "network_list"]

SECTION = "networks"


def _networks() -> QuerySet[Network]:
    """Every network with the number of VMs on it (a destroyed VM has left its network)."""
    attached = Count("vms", filter=~Q(vms__state=lifecycle.GONE))
    return Network.objects.annotate(vm_count=attached).order_by("name")


def _may(caller: Caller) -> dict[str, bool]:
    return {a: policy.may_manage_networks(caller, a) for a in policy.NETWORK_PERMISSIONS}


def _attach(form: NetworkForm, exc: ValidationError) -> None:
    """The command's refusal on the fields it names (the others above the form)."""
    if not hasattr(exc, "message_dict"):
        form.add_error(None, exc.messages)
        return
    for key, errors in exc.message_dict.items():
        form.add_error(key if key in form.fields else None, errors)


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return " ".join(exc.messages)
    return str(exc)


@require_http_methods(["GET", "POST"])
@login_required
def network_list(request: HttpRequest) -> HttpResponse:
    """The networks; for administrators, the form that defines a new one (POST here)."""
    caller = Caller.from_request(request)
    form: NetworkForm | None = None
    if request.method == "POST":
        policy.require_network_admin(caller, "add")
        form = NetworkForm(request.POST)
        if form.is_valid():
            try:
                network = commands.create_network(caller, **form.cleaned_data)
            except ValidationError as exc:
                _attach(form, exc)
            else:
                messages.success(request, f"Network {network.name} created ({network.subnet}).")
                return redirect("networks:list")
    may = _may(caller)
    if form is None and may["add"]:
        form = NetworkForm()
    return render(
        request,
        "vms/networks.html",
        {"networks": _networks(), "form": form, "may": may, "section": SECTION},
    )


@require_http_methods(["GET", "POST"])
@login_required
def network_edit(request: HttpRequest, pk: Any) -> HttpResponse:
    """Change a network (administrators). Only the fields the form changed go to the command,
    so a network with VMs on it can be renamed without its subnet being asked about."""
    caller = Caller.from_request(request)
    policy.require_network_admin(caller, "change")
    network = get_object_or_404(_networks(), pk=pk)
    initial = {name: getattr(network, name) for name in NetworkForm.base_fields}
    form = NetworkForm(request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid():
        changes = {name: form.cleaned_data[name] for name in form.changed_data}
        if not changes:
            messages.info(request, f"Network {network.name}: nothing to change.")
            return redirect("networks:list")
        try:
            changed = commands.update_network(caller, network, **changes)
        except commands.NotFound as exc:
            raise Http404(str(exc)) from None
        except ValidationError as exc:
            _attach(form, exc)
        else:
            messages.success(request, f"Network {changed.name} changed: {', '.join(changes)}.")
            return redirect("networks:list")
    return render(
        request,
        "vms/network_edit.html",
        {"network": network, "form": form, "section": SECTION},
    )


@require_POST
@login_required
def network_delete(request: HttpRequest, pk: Any) -> HttpResponse:
    """Delete a network (administrators): the command refuses the default one and one with VMs
    on it; its reason is shown above the list."""
    caller = Caller.from_request(request)
    policy.require_network_admin(caller, "delete")
    network = get_object_or_404(Network, pk=pk)
    try:
        commands.delete_network(caller, network)
    except (ValidationError, commands.NotFound) as exc:
        messages.error(request, f"Delete of {network.name} refused: {_reason(exc)}")
    else:
        messages.success(request, f"Network {network.name} deleted.")
    return redirect("networks:list")
