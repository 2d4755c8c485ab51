"""Dashboard pages of the hypervisor hosts, for readers of all VMs (``vms.policy``): the hosts
that run VMs or a worker, what each holds (VMs live on it, vCPUs and memory they were given),
its capacity, what is committed to it and what it really uses (``vms.capacity``),
and a host's page with its VMs and the summed usage history of the VMs it ran
(``/api/v1/hosts/<name>/usage/``). Anyone else gets a 403."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q, Sum
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from accounts.caller import Caller
from vms import capacity, lifecycle, policy, runtime
from vms.metrics_live import LIVE_STATES
from vms.models import VirtualMachine, WorkerHeartbeat
from vms.usage_api import HOST_NAME

__all__ = ["host_detail", "host_list"]


def _require(request: HttpRequest) -> None:
    if not policy.may_see_usage_rollups(Caller.from_request(request)):
        raise PermissionDenied("only readers of all VMs see the hosts")


def _held(qs: Any) -> Any:
    """Per host: the VMs live on it and the vCPUs and memory those were given."""
    live = Q(state__in=LIVE_STATES)
    return qs.values("host").annotate(
        live=Count("pk", filter=live),
        vcpus=Sum("vcpus", filter=live),
        memory_mib=Sum("memory_mib", filter=live),
        known=Count("pk", filter=~Q(state=lifecycle.GONE)),
    )


@require_GET
@login_required
def host_list(request: HttpRequest) -> HttpResponse:
    _require(request)
    rows = {r["host"]: r for r in _held(VirtualMachine.objects.exclude(host=""))}
    workers = {w.host: w for w in WorkerHeartbeat.objects.all()}
    report = capacity.report()
    measured = {h["name"]: h for h in report["hosts"]}
    hosts = [
        {
            "name": name,
            "live": rows.get(name, {}).get("live") or 0,
            "known": rows.get(name, {}).get("known") or 0,
            "vcpus": rows.get(name, {}).get("vcpus") or 0,
            "memory_mib": rows.get(name, {}).get("memory_mib") or 0,
            "worker": workers.get(name),
            "this": name == runtime.host_name(),
            "capacity": measured.get(name),
        }
        for name in sorted(set(rows) | set(workers) | set(measured))
    ]
    return render(
        request,
        "vms/hosts.html",
        {"hosts": hosts, "overcommit": report["settings"], "section": "hosts"},
    )


@require_GET
@login_required
def host_detail(request: HttpRequest, name: str) -> HttpResponse:
    _require(request)
    if not HOST_NAME.fullmatch(name):
        raise Http404("no such host")
    vms = (
        policy.visible_vms(Caller.from_request(request))
        .filter(host=name)
        .exclude(state=lifecycle.GONE)
        .order_by("name")
    )
    held = next(iter(_held(VirtualMachine.objects.filter(host=name))), None) or {}
    return render(
        request,
        "vms/host.html",
        {
            "name": name,
            "vms": vms,
            "held": held,
            "worker": WorkerHeartbeat.objects.filter(host=name).first(),
            "section": "hosts",
        },
    )
