"""Dashboard page of quotas and team budgets, for administrators (``vms.policy.may_manage_quotas``).

It lists every quota set for a user or a group and every team budget (with what its VMs hold),
and its form sets one level's limits through ``vms.commands.set_quota`` /
``set_group_budget``, which append ``quota.changed`` with the limits before and after; the view
never writes a quota row. Anyone else gets a 403 before any input is read.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from accounts.caller import Caller
from accounts.models import User
from vms import commands, policy, quotas
from vms.forms import QuotaForm
from vms.models import GroupBudget, Quota

__all__ = ["quota_admin"]


def _rows(of: str) -> list[dict[str, Any]]:
    """The quotas set for users (``of`` "user") or groups ("group"), by name."""
    rows = (
        Quota.objects.filter(**{f"{of}__isnull": False})
        .select_related(of)
        .order_by("user__username" if of == "user" else "group__name")
    )
    return [
        {
            "name": row.user.username if row.user is not None else row.group.name,  # type: ignore[union-attr]
            "limits": [getattr(row, f"max_{r}") for r in quotas.RESOURCES],
        }
        for row in rows
    ]


def _budgets() -> list[dict[str, Any]]:
    out = []
    for budget in GroupBudget.objects.select_related("group").order_by("group__name"):
        state = quotas.budget_state(budget.group_id)
        if state is None:
            continue
        out.append(
            {
                "group": state.group,
                "cells": [(state.used[r], state.limits[r]) for r in quotas.RESOURCES],
            }
        )
    return out


def _initial(level: str, name: str) -> dict[str, Any]:
    """The form filled with the limits set now at ``level`` for ``name`` (an edit link)."""
    initial: dict[str, Any] = {"level": level, "name": name}
    if level == "user":
        user = User.objects.filter(username=name).first()
        limits = quotas.limits_set(user=user) if user is not None else {}
    else:
        group = Group.objects.filter(name=name).first()
        if group is None:
            limits = {}
        elif level == "budget":
            limits = quotas.limits_set(budget_of=group)
        else:
            limits = quotas.limits_set(group=group)
    return initial | limits


@require_http_methods(["GET", "POST"])
@login_required
def quota_admin(request: HttpRequest) -> HttpResponse:
    caller = Caller.from_request(request)
    policy.require_quota_admin(caller)
    if request.method == "POST":
        form = QuotaForm(request.POST)
        if form.is_valid():
            d = form.cleaned_data
            limits = {r: d[r] for r in quotas.RESOURCES}
            try:
                if d["level"] == "user":
                    user = User.objects.filter(username=d["name"]).first()
                    if user is None:
                        raise ValidationError({"name": f"no user named {d['name']!r}"})
                    before = quotas.limits_set(user=user)
                    commands.set_quota(caller, user=user, limits=limits)
                else:
                    group = Group.objects.filter(name=d["name"]).first()
                    if group is None:
                        raise ValidationError({"name": f"no group named {d['name']!r}"})
                    if d["level"] == "budget":
                        before = quotas.limits_set(budget_of=group)
                        commands.set_group_budget(caller, group, limits)
                    else:
                        before = quotas.limits_set(group=group)
                        commands.set_quota(caller, group=group, limits=limits)
            except ValidationError as exc:
                for key, errors in exc.message_dict.items():
                    form.add_error(key if key in form.fields else None, errors)
            else:
                level = dict(QuotaForm.LEVELS)[d["level"]]
                if before == limits:
                    messages.info(request, f"{level} of {d['name']}: no change.")
                else:
                    messages.success(
                        request, f"{level} of {d['name']} set (a quota.changed event)."
                    )
                return redirect("vms:quotas")
    else:
        level, name = request.GET.get("level", ""), request.GET.get("name", "")
        known = level in dict(QuotaForm.LEVELS) and bool(name)
        form = QuotaForm(initial=_initial(level, name[:150]) if known else {"level": "user"})
    return render(
        request,
        "vms/quotas.html",
        {
            "form": form,
            "resources": quotas.RESOURCES,
            "user_quotas": _rows("user"),
            "group_quotas": _rows("group"),
            "budgets": _budgets(),
            "section": "quotas",
        },
    )
