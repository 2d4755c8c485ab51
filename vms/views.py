"""Dashboard pages of the VM domain: the list, the create form, a VM's page with every action of
the API, the exec box and the console.

Views parse input and call ``vms.commands`` (state changes) or ``vms.guest`` (exec); they never
append events or write read models. Errors are shown where they happen: a refused action as a
message above the actions, a refused form field on the field, and an action that fails later (in
the worker) as the VM's last error and in its live timeline.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST

from accounts.caller import Caller
from audit.commands import read_details, record_trail_read
from secretstore import policy as secret_policy
from vms import (
    commands,
    console,
    errors,
    forks,
    guest,
    lifecycle,
    live,
    netevidence,
    policy,
    pools,
    preview_views,
    quotas,
    rightsizing,
)
from vms.forms import (
    BULK_VERBS,
    SORTS,
    BulkForm,
    CloneForm,
    CreateVMForm,
    ExecForm,
    FilterForm,
    ForkForm,
    IdleForm,
    LifetimeForm,
    ResizeForm,
    SnapshotForm,
    StopForm,
)
from vms.models import Snapshot, Template, VirtualMachine
from vms.representation import represent_vm

REFUSALS = (
    commands.InvalidState,
    commands.NotFound,
    quotas.QuotaExceeded,
    PermissionDenied,
    ValidationError,
    guest.GuestUnavailable,
)


def _explain(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        if hasattr(exc, "message_dict"):
            return "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())
        return " ".join(exc.messages)
    return str(exc)


def _vm(request: HttpRequest, pk: Any) -> VirtualMachine:
    vm = policy.visible_vms(Caller.from_request(request)).filter(pk=pk).first()
    if vm is None:
        raise Http404("no such VM")  # another operator's VM looks exactly like a missing one
    return vm


def _quota_context(user: Any) -> dict[str, Any]:
    """The user's limits, who set each, its usage and its groups' team budgets
    (``quotas.quota_report``, as ``GET /api/v1/quotas/me/`` shows them)."""
    report = quotas.quota_report(user)
    quota, used, remaining = report["quota"], report["used"], report["remaining"]
    rows = [
        {
            "resource": r,
            "limit": quota[r],
            "source": quota["sources"][r],
            "used": used[r],
            "remaining": remaining[r],
            "limited_by": report["limited_by"][r],
        }
        for r in quotas.RESOURCES
    ]
    budgets = [
        {
            "group": b["group"],
            "default": b["group"] == report["budget"],
            "rows": [
                {
                    "resource": r,
                    "limit": b["limits"][r],
                    "used": b["used"][r],
                    "remaining": b["remaining"][r],
                }
                for r in quotas.RESOURCES
            ],
        }
        for b in report["budgets"]
    ]
    return {
        "quota_rows": rows,
        "quota_source": quota["source"],
        "remaining": remaining,
        "budgets": budgets,
        "budget_default": report["budget"],
    }


# --- The list ---------------------------------------------------------------------------------


@require_GET
@login_required
def vm_list(request: HttpRequest) -> HttpResponse:
    caller = Caller.from_request(request)
    form = FilterForm(request.GET or None)
    f = form.cleaned_data if form.is_valid() else {}
    sort = f.get("sort") or ""
    key = SORTS.get(sort.lstrip("-"))
    order = [f"-{key}" if sort.startswith("-") else key, "name", "pk"] if key else ["-created_at"]
    qs = policy.visible_vms(caller).order_by(*order)
    state = f.get("state") or ""
    if state == "":
        qs = qs.exclude(state=lifecycle.GONE)
    elif state != "all":
        qs = qs.filter(state=state)
    if f.get("q"):
        qs = qs.filter(name__icontains=f["q"])
    if f.get("template"):
        qs = qs.filter(template=f["template"])
    sees_all = policy.sees_all_vms(caller)
    if f.get("owner") and sees_all:
        qs = qs.filter(owner__username=f["owner"])
    # Pages of LIST_PAGE: a count and one slice, as fast with thousands of VMs as with ten.
    paginator = Paginator(qs, LIST_PAGE)
    page = paginator.get_page(f.get("page") or 1)
    base = request.GET.copy()
    base.pop("page", None)
    base.pop("sort", None)
    headers = []
    for label, name in LIST_COLUMNS:
        if name is None or (name == "owner" and not sees_all):
            headers.append({"label": label, "sort": None} if name != "owner" else None)
            continue
        current = sort.lstrip("-") == name
        descending = current and sort.startswith("-")
        query = base.copy()
        query["sort"] = name if (not current or descending) else f"-{name}"
        headers.append(
            {
                "label": label,
                "url": "?" + query.urlencode(),
                "aria": ("descending" if descending else "ascending") if current else None,
            }
        )
    vms = list(page.object_list)
    for vm in vms:  # the row's own buttons: what the caller may ask of it in its state
        vm.row_verbs = [
            v
            for v in ROW_VERBS
            if vm.state in lifecycle.verb(v).allowed_from and policy.may(caller, v, vm.owner_id)
        ]
    pages = request.GET.copy()
    pages.pop("page", None)
    return render(
        request,
        "vms/list.html",
        {
            "form": form,
            "vms": vms,
            "page": page,
            "page_query": pages.urlencode(),
            "headers": [h for h in headers if h is not None],
            "sees_all": sees_all,
            "bulk_verbs": [v for v in BULK_VERBS if policy.may(caller, v, caller.user.pk)],
            "templates": Template.objects.filter(enabled=True),
            "filters": json.dumps(
                {
                    "q": f.get("q") or "",
                    "state": state,
                    "template": f.get("template") or "",
                    "owner": f.get("owner") or "",
                    # Live rows join only the first page of the newest-first order.
                    "takes_new": not sort and page.number == 1,
                }
            ),
            "section": "vms",
        },
    )


LIST_PAGE = 50
ROW_VERBS = ("start", "stop")
# The list's columns: label and sort key (None: not sortable).
LIST_COLUMNS = (
    ("Name", "name"), ("Owner", "owner"), ("State", "state"), ("Template", "template"),
    ("vCPU", "vcpus"), ("Memory", "memory"),
    # Live (the page's websocket): CPU % of one core, memory the guest uses, its uptime.
    ("CPU", None), ("Used", None), ("Uptime", None),
    ("Address", "ip"), ("Since", "since"),
)  # fmt: skip


@require_POST
@login_required
def vm_bulk(request: HttpRequest) -> HttpResponse:
    """One verb for many VMs: first a review page saying, VM by VM, what will be asked and what
    will be skipped and why; then, confirmed, each request through the commands as a single
    action would (each VM's state and permission checked again, under the lock)."""
    caller = Caller.from_request(request)
    form = BulkForm(request.POST)
    if not form.is_valid():
        messages.error(request, f"Bulk action refused: {_explain(ValidationError(form.errors))}")
        return redirect("vms:list")
    verb, ids = form.cleaned_data["verb"], form.cleaned_data["ids"]
    found = {vm.pk: vm for vm in policy.visible_vms(caller).filter(pk__in=ids)}
    row = lifecycle.verb(verb)
    plan = []
    for vm_id in ids:
        vm = found.get(vm_id)
        if vm is None:
            plan.append({"id": vm_id, "vm": None, "will": False, "why": "no such VM"})
        elif not policy.may(caller, verb, vm.owner_id):
            plan.append({"id": vm_id, "vm": vm, "will": False, "why": "not allowed"})
        elif vm.state not in row.allowed_from:
            plan.append({"id": vm_id, "vm": vm, "will": False, "why": f"it is {vm.state}"})
        else:
            plan.append({"id": vm_id, "vm": vm, "will": True, "why": ""})
    if not form.cleaned_data["confirm"]:
        return render(
            request,
            "vms/bulk_review.html",
            {"verb": verb, "plan": plan, "force": form.cleaned_data["force"], "section": "vms"},
        )
    done, refused = [], []
    params = {"force": form.cleaned_data["force"]} if verb == "stop" else {}
    for item in plan:
        if not item["will"]:
            continue
        try:
            commands.perform(caller, item["vm"], verb, **params)
            done.append(item["vm"].name)
        except REFUSALS as exc:
            refused.append(f"{item['vm'].name}: {_explain(exc)}")
    if done:
        messages.success(
            request, f"{verb.capitalize()} requested for {len(done)}: {', '.join(done)}."
        )
    if refused:
        messages.error(request, f"{verb.capitalize()} refused for {'; '.join(refused)}")
    if not done and not refused:
        messages.info(request, f"Nothing to {verb}: no ticked VM could be asked.")
    return redirect("vms:list")


# --- Create -----------------------------------------------------------------------------------


@login_required
def vm_create(request: HttpRequest) -> HttpResponse:
    caller = Caller.from_request(request)
    policy.require(caller, "create")
    context = _quota_context(request.user)
    form = CreateVMForm(
        request.POST or None,
        initial={"template": "linux-small", "start": True},
        budgets=[b["group"] for b in context["budgets"]],
    )
    if request.method == "POST" and form.is_valid():
        d = form.cleaned_data
        try:
            result = pools.create(
                caller,
                name=d["name"],
                template=d["template"],
                vcpus=d["vcpus"],
                memory_mib=d["memory_mib"],
                disk_mib=d["disk_mib"],
                start_now=d["start"],
                secrets=d["secrets"],
                budget=d.get("budget") or None,
                timeout_s=d.get("timeout_s"),
                priority=d.get("priority") or None,
            )
        except quotas.QuotaExceeded as exc:
            field = {"vcpus": "vcpus", "memory_mib": "memory_mib", "disk_mib": "disk_mib"}
            why = "No room on the hosts" if exc.scope == "host" else "Over quota"
            form.add_error(field.get(exc.quota), f"{why}: {exc}")
        except ValidationError as exc:
            for key, errors in exc.message_dict.items():
                form.add_error(key if key in form.fields else None, errors)
        except PermissionDenied as exc:  # secrets named without the right to give them
            form.add_error("secrets", str(exc))
        else:
            messages.success(request, f"VM {result.vm.name} created.")
            return redirect("vms:detail", pk=result.vm.pk)
    tpls = list(Template.objects.filter(enabled=True))
    templates = [
        {"name": t.name, "vcpus": t.vcpus, "memory_mib": t.memory_mib, "disk_mib": t.disk_mib}
        for t in tpls
    ]
    return render(
        request,
        "vms/create.html",
        {
            "form": form,
            "templates_json": templates,
            "template_secrets": [(t.name, t.secrets) for t in tpls if t.secrets],
            "usable_secrets": secret_policy.usable_by_user(request.user).order_by("name"),
            **context,
        },
    )


# --- A VM's page ------------------------------------------------------------------------------


# The dashboard's groups of buttons, each shown if the caller may do its verb to the VM.
_CAN = {
    "operate": "start",
    "snapshot": "snapshot",
    "rollback": "restore",
    "destroy": "destroy",
    "exec": "exec",
    "console": "console",
    "clone": "clone",
}


# The egress evidence periods a VM's page shows (the rest: its timeline, the audit trail).
EVIDENCE_PERIODS = netevidence.DEFAULT_PERIODS


@require_GET
@login_required
def vm_detail(request: HttpRequest, pk: Any) -> HttpResponse:
    caller = Caller.from_request(request)
    vm = _vm(request, pk)
    timeline = live.vm_timeline(vm, limit=100)
    evidence = netevidence.periods(vm, limit=EVIDENCE_PERIODS)
    # Showing the VM's events is reading the trail: one audit.trail_read per page view, naming
    # every event shown (the timeline's and the egress evidence's, once each).
    shown = {e["position"] for e in timeline} | {p for e in evidence for p in e.positions}
    record_trail_read(
        request,
        "dashboard.vm_timeline",
        read_details({"vm": str(vm.pk)}, [{"position": p} for p in sorted(shown)]),
    )
    may = {v.name: policy.may(caller, v.name, vm.owner_id) for v in lifecycle.VERBS}
    return render(
        request,
        "vms/detail.html",
        {
            "vm": vm,
            "vm_json": represent_vm(vm),
            "timeline": list(reversed(timeline)),
            "evidence": evidence,
            "evidence_limit": EVIDENCE_PERIODS,
            "evidence_types": netevidence.EVIDENCE_TYPES,
            "last_position": timeline[-1]["position"] if timeline else 0,
            **_snapshot_rows(caller, vm, may),
            "rules": RULES_JSON,
            "buttons": [verb for verb in BUTTON_VERBS if may[verb]],
            "can": {**may, **{group: may[verb] for group, verb in _CAN.items()}},
            "lifetime_form": LifetimeForm(),
            "fork_max": forks.fork_limit(),
            "idle_form": IdleForm(
                initial={
                    "idle_timeout_s": vm.idle_timeout_s or "off",
                    "idle_to_disk": vm.idle_to_disk,
                }
            ),
            "resize_form": ResizeForm(initial={"vcpus": vm.vcpus, "memory_mib": vm.memory_mib}),
            "snapshot_form": SnapshotForm(),
            "exec_form": ExecForm(),
            "preview_links": preview_views.open_links(vm),
            "sizing": rightsizing.recommend(vm),
        },
    )


def _snapshot_rows(caller: Caller, vm: VirtualMachine, may: dict[str, bool]) -> dict[str, Any]:
    """What the page's snapshot rows show (vms/_snapshot_rows.html)."""
    return {
        "snapshots": policy.visible_snapshots(caller)
        .filter(vm=vm)
        .exclude(state=Snapshot.State.DELETED),
        "snapshot_actions": [a for a in SNAPSHOT_ACTIONS if may[a["verb"]]],
    }


@require_GET
@login_required
def vm_snapshots(request: HttpRequest, pk: Any) -> JsonResponse:
    """A VM's snapshot rows alone, as JSON (``rows``: the page's own row template, rendered): the
    page fetches them again when a snapshot event arrives, so a snapshot being taken shows its
    state and size without a reload. JSON, not an HTML page: nobody browses to it."""
    caller = Caller.from_request(request)
    vm = _vm(request, pk)
    may = {a["verb"]: policy.may(caller, a["verb"], vm.owner_id) for a in SNAPSHOT_ACTIONS}
    context = {"vm": vm, **_snapshot_rows(caller, vm, may)}
    rows = render_to_string("vms/_snapshot_rows.html", context, request=request)
    return JsonResponse({"rows": rows, "count": len(context["snapshots"])})


# The worker's verbs a VM's page offers (the lifecycle table's; a restore is a snapshot's).
PAGE_VERBS = frozenset(
    v.name for v in lifecycle.REQUEST_VERBS if v.api is not None and v.api.resource == "vms"
)
# Those asked with a form of their own on the page (its fields), and a destroy (apart, with a
# confirmation); every other one is a button, in the table's order.
FORM_VERBS = frozenset({"resize", "snapshot"})
BUTTON_VERBS = tuple(
    v.name
    for v in lifecycle.REQUEST_VERBS
    if v.name in PAGE_VERBS and v.name not in FORM_VERBS and not v.overtakes
)


# What the page's script enables by the VM's state (vmdetail.js): per verb of the table, the
# states it may be asked from and whether it overtakes a pending request (a destroy does).
RULES_JSON = {
    v.name: {"from": sorted(v.allowed_from), "overtakes": v.overtakes}
    for v in lifecycle.VERBS
    if v.allowed_from
}

# The verbs a snapshot's row offers: the table's snapshot routes, in its order (a clone names the
# new VM; the others ask to confirm).
SNAPSHOT_VERBS = tuple(
    v.name for v in lifecycle.VERBS if v.api is not None and v.api.resource == "snapshots"
)
_SNAPSHOT_LABELS = {"restore": "Restore", "clone": "Clone", "delete_snapshot": "Delete"}
SNAPSHOT_ACTIONS = tuple(
    {
        "verb": verb,
        "label": _SNAPSHOT_LABELS.get(verb, verb.replace("_", " ").capitalize()),
        "names_new_vm": lifecycle.verb(verb).target == "snapshot"
        and lifecycle.verb(verb).records == ("vm.created",),
    }
    for verb in SNAPSHOT_VERBS
)


def _action_input(request: HttpRequest, vm: VirtualMachine, verb: str) -> dict[str, Any]:
    """The form input of a verb that takes some (``commands.WITH_INPUT``), as its command's
    keyword arguments."""
    if verb == "stop":
        stop = StopForm(request.POST)
        stop.is_valid()
        return {"force": bool(stop.cleaned_data.get("force"))}
    if verb == "resize":
        resize = ResizeForm(request.POST)
        if not resize.is_valid():
            raise ValidationError(resize.errors.get_json_data())
        changes = {k: v for k, v in resize.cleaned_data.items() if v is not None}
        if changes.get("vcpus") == vm.vcpus:
            changes.pop("vcpus")
        if changes.get("memory_mib") == vm.memory_mib:
            changes.pop("memory_mib")
        if not changes:
            raise ValidationError("nothing to change: give other vCPUs or memory")
        return changes
    if verb == "snapshot":
        snap = SnapshotForm(request.POST)
        snap.is_valid()
        return {"name": snap.cleaned_data.get("name") or ""}
    return {}


def _run_action(request: HttpRequest, vm: VirtualMachine, verb: str) -> str:
    if verb not in PAGE_VERBS:
        raise Http404("no such action")
    params = _action_input(request, vm, verb)
    commands.perform(Caller.from_request(request), vm, verb, **params)
    return f"{verb.capitalize()} requested."


@require_POST
@login_required
def vm_action(request: HttpRequest, pk: Any, verb: str) -> HttpResponse:
    vm = _vm(request, pk)
    try:
        messages.success(request, _run_action(request, vm, verb))
    except REFUSALS as exc:
        messages.error(request, f"{verb.capitalize()} refused: {_explain(exc)}")
    # The list's row buttons come back to the list (its filters and page); only a local path.
    back = request.POST.get("next", "")
    if (
        back
        and url_has_allowed_host_and_scheme(back, allowed_hosts=None)
        and back.startswith("/vms/")
    ):
        return redirect(back)
    return redirect("vms:detail", pk=vm.pk)


@require_POST
@login_required
def vm_lifetime(request: HttpRequest, pk: Any) -> HttpResponse:
    """The page's lifetime form: set, extend or clear (0) the VM's lifetime from now
    (``commands.set_lifetime``, as the API's)."""
    vm = _vm(request, pk)
    form = LifetimeForm(request.POST)
    try:
        if not form.is_valid():
            raise ValidationError(form.errors.get_json_data())
        event = commands.set_lifetime(
            Caller.from_request(request), vm, timeout_s=form.cleaned_data["timeout_s"]
        )
    except REFUSALS as exc:
        messages.error(request, f"Lifetime refused: {_explain(exc)}")
    else:
        ends = event.data["expires_at"]
        messages.success(request, f"Lifetime set: ends {ends}." if ends else "Lifetime cleared.")
    return redirect("vms:detail", pk=vm.pk)


@require_POST
@login_required
def vm_fork(request: HttpRequest, pk: Any) -> HttpResponse:
    """The page's fork form: ``count`` new VMs from this running VM (``commands.fork``, as the
    API's); then the fork's progress page."""
    vm = _vm(request, pk)
    form = ForkForm(request.POST)
    try:
        if not form.is_valid():
            raise ValidationError(form.errors.get_json_data())
        forked = commands.fork(Caller.from_request(request), vm, count=form.cleaned_data["count"])
    except REFUSALS as exc:
        messages.error(request, f"Fork refused: {_explain(exc)}")
        return redirect("vms:detail", pk=vm.pk)
    n = len(forked.vms)
    messages.success(
        request, f"Fork of {vm.name} into {n} new VM{'s' if n != 1 else ''} requested."
    )
    return redirect("vms:fork-status", pk=vm.pk, snapshot_pk=forked.snapshot.pk)


@require_GET
@login_required
def vm_fork_status(request: HttpRequest, pk: Any, snapshot_pk: Any) -> HttpResponse:
    """A fork's progress (``vms.forks.status``): k of its N new VMs running, failed, pending;
    the page's script follows the API's fork status until none is pending."""
    vm = _vm(request, pk)
    status = forks.status(Caller.from_request(request), vm, snapshot_pk)
    if status is None:
        raise Http404("no such fork")
    return render(
        request,
        "vms/fork.html",
        {"vm": vm, "fork": status, "status_url": forks.status_path(vm.pk, snapshot_pk)},
    )


@require_POST
@login_required
def vm_idle(request: HttpRequest, pk: Any) -> HttpResponse:
    """The page's idle policy form: pause after so many seconds without guest activity, or
    "off" (``commands.set_idle``, as the API's)."""
    vm = _vm(request, pk)
    form = IdleForm(request.POST)
    try:
        if not form.is_valid():
            raise ValidationError(form.errors.get_json_data())
        event = commands.set_idle(
            Caller.from_request(request),
            vm,
            idle_timeout_s=form.cleaned_data["idle_timeout_s"],
            idle_to_disk=form.cleaned_data["idle_to_disk"],
        )
    except REFUSALS as exc:
        messages.error(request, f"Idle policy refused: {_explain(exc)}")
    else:
        after = event.data["idle_timeout_s"]
        how = "suspended to disk" if event.data.get("idle_to_disk") else "paused"
        messages.success(
            request,
            f"Idle policy set: {how} after {after} s without activity."
            if after
            else "Idle policy off.",
        )
    return redirect("vms:detail", pk=vm.pk)


@require_POST
@login_required
def snapshot_action(request: HttpRequest, pk: Any, snapshot_pk: Any, verb: str) -> HttpResponse:
    caller = Caller.from_request(request)
    vm = _vm(request, pk)
    snap = policy.visible_snapshots(caller).filter(pk=snapshot_pk, vm=vm).first()
    if snap is None:
        raise Http404("no such snapshot")
    if verb not in SNAPSHOT_VERBS:
        raise Http404("no such action")
    try:
        if verb == "restore":
            commands.restore(caller, vm, snap)
            messages.success(request, f"Restore of {snap.name} requested.")
        elif verb == "clone":
            form = CloneForm(request.POST)
            if not form.is_valid():
                raise ValidationError({"name": "give the new VM a name"})
            result = commands.clone(caller, snap, name=form.cleaned_data["name"])
            messages.success(request, f"Clone {result.vm.name} requested.")
            return redirect("vms:detail", pk=result.vm.pk)
        elif verb == "delete_snapshot":
            commands.delete_snapshot(caller, snap)
            messages.success(request, f"Snapshot {snap.name} deleted.")
        else:  # a snapshot verb of the table this page cannot carry out yet
            raise Http404("no such action")
    except REFUSALS as exc:
        messages.error(request, f"{verb.capitalize()} refused: {_explain(exc)}")
    return redirect("vms:detail", pk=vm.pk)


def _exec_refusal(exc: Exception) -> JsonResponse:
    """The API's answer to an exec that failed (vms.errors), with the text the page shows as
    "error"; a failure after the request was recorded is in the log as vm.exec_failed
    (vms.guest). Anything else is raised again."""
    answer = errors.answer_for(exc)
    if answer is None:
        raise exc
    return JsonResponse({**answer.body, "error": answer.message}, status=answer.status)


@require_POST
@login_required
def vm_exec(request: HttpRequest, pk: Any) -> JsonResponse:
    """The exec box: run one command, answer its output as JSON (audited like the API's)."""
    vm = _vm(request, pk)
    form = ExecForm(request.POST)
    try:
        if not form.is_valid():
            raise ValidationError(form.errors)
        result = guest.run_exec(
            Caller.from_request(request),
            vm,
            form.cleaned_data["command"],
            timeout=form.cleaned_data.get("timeout") or 30.0,
        )
    except Exception as exc:
        return _exec_refusal(exc)
    return JsonResponse(
        {
            "exit_code": result.exit_code,
            "signal": result.signal,
            "timed_out": result.timed_out,
            "duration_s": round(result.duration_s, 3),
            "stdout": result.stdout.decode(errors="replace"),
            "stderr": result.stderr.decode(errors="replace"),
            "truncated": result.stdout_truncated or result.stderr_truncated,
            "event_position": result.event_position,
        }
    )


# The console's SysRq menu: Magic SysRq keys a serial line cannot send (a BREAK), asked of the
# guest's kernel through /proc/sysrq-trigger by its agent (an exec, audited as one). The key is
# the script's argument, never part of its text; the kernel's new lines are written to the
# console, where the user is looking (a quiet kernel keeps them off it otherwise).
SYSRQ_KEYS = {
    "h": "help",
    "m": "show memory",
    "t": "show tasks",
    "w": "show blocked tasks",
    "l": "show CPU backtraces",
    "s": "sync filesystems",
    "u": "remount filesystems read-only",
}
SYSRQ_SCRIPT = (
    'n=$(dmesg | wc -l); echo "$1" > /proc/sysrq-trigger; sleep 0.2; '
    "dmesg | tail -n +$((n + 1)) > /dev/console"
)


@require_POST
@login_required
def vm_sysrq(request: HttpRequest, pk: Any) -> JsonResponse:
    """One SysRq key of ``SYSRQ_KEYS`` for the guest's kernel (the console page's menu)."""
    vm = _vm(request, pk)
    key = request.POST.get("key", "")
    if key not in SYSRQ_KEYS:
        return JsonResponse(
            {"error": f"key: one of {', '.join(SYSRQ_KEYS)}", "key": ["not a SysRq key offered"]},
            status=400,
        )
    try:
        result = guest.run_exec(
            Caller.from_request(request), vm, ["sh", "-c", SYSRQ_SCRIPT, "sysrq", key], timeout=15.0
        )
    except Exception as exc:
        return _exec_refusal(exc)
    return JsonResponse(
        {"key": key, "action": SYSRQ_KEYS[key], "exit_code": result.exit_code,
         "event_position": result.event_position}
    )  # fmt: skip


@require_GET
@login_required
def vm_console(request: HttpRequest, pk: Any) -> HttpResponse:
    vm = _vm(request, pk)
    access = console.access_for(request.user, vm.pk)
    if access is None:
        raise Http404("no console for this VM")
    popout = request.GET.get("popout") == "1"
    caller = Caller.from_request(request)
    return render(
        request,
        "vms/console.html",
        {
            "vm": vm,
            "mode": access.mode,
            "popout": popout,
            "bare": popout,
            # Ctrl-Alt-Del is the guest's own reboot (the Reboot verb); SysRq keys are an exec.
            "may_reboot": vm.state in lifecycle.verb("reboot").allowed_from
            and policy.may(caller, "reboot", vm.owner_id),
            "may_sysrq": vm.state in lifecycle.verb("exec").allowed_from
            and policy.may(caller, "exec", vm.owner_id),
            "sysrq_keys": SYSRQ_KEYS.items(),
        },
    )
