"""Dashboard page of the warm pools (``vms.pools``): per template its target, ready and warming
members and the memory they take, the pool budget used of its total, and whether this host
serves creates from pools (``pools.report``, as ``GET /api/v1/pools/`` answers it).

Readers of the pools (``vms.view_poolmember``) see the page; those who may change them
(``vms.change_poolmember``: administrators) also get a form per template that sets its target
through ``vms.commands.set_pool_target`` (``pool.target_set``), the API's own command, which
checks the template and the range. Anyone else gets a 403 before any input is read.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from accounts.caller import Caller
from vms import commands, policy, pools
from vms.forms import PoolTargetForm
from vms.models import Template

__all__ = ["pool_list", "pool_target"]

SECTION = "pools"


def _page(
    request: HttpRequest, caller: Caller, errors: dict[str, str] | None = None, status: int = 200
) -> HttpResponse:
    report = pools.report()
    listed = {p["template"] for p in report["pools"]}
    # Enabled templates with no pool yet: a row each, so that a first target can be set.
    idle = [
        {"template": name, "target": 0, "ready": 0, "warming": 0, "memory_mib": 0}
        for name in Template.objects.filter(enabled=True).values_list("name", flat=True)
        if name not in listed
    ]
    shown = sorted([*report["pools"], *idle], key=lambda p: p["template"])
    budget, used = report["budget_mib"], report["used_mib"]
    return render(
        request,
        "vms/pools.html",
        {
            "report": report,
            "rows": [{**p, "error": (errors or {}).get(p["template"], "")} for p in shown],
            "budget_pct": round(100 * used / budget) if budget else 0,
            "may_set": policy.may_manage_pools(caller, "change"),
            "target_max": commands.POOL_TARGET_MAX,
            "section": SECTION,
        },
        status=status,
    )


@require_GET
@login_required
def pool_list(request: HttpRequest) -> HttpResponse:
    caller = Caller.from_request(request)
    policy.require_pool_admin(caller, "view")
    return _page(request, caller)


@require_POST
@login_required
def pool_target(request: HttpRequest, template: str) -> HttpResponse:
    """One template's target form: ``commands.set_pool_target`` (the API's); a refused one is
    shown on its row (400) and changes nothing."""
    caller = Caller.from_request(request)
    policy.require_pool_admin(caller)
    form = PoolTargetForm(request.POST)
    text = ""
    if not form.is_valid():
        text = " ".join(form.errors.get("target", ["give a target"]))
    else:
        try:
            event = commands.set_pool_target(caller, template, form.cleaned_data["target"])
        except commands.NotFound as exc:
            text = str(exc)
        except ValidationError as exc:
            text = " ".join(exc.messages)
    if text:
        messages.error(request, f"Target of {template} refused: {text}")
        return _page(request, caller, {template: text}, status=400)
    d = event.data
    messages.success(request, f"Target of {template} set to {d['target']} (was {d['before']}).")
    return redirect("vms:pools")
