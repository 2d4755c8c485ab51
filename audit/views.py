"""The auditor area of the dashboard: trail, event detail, digests and keys, exports.

Every page needs ``audit.view_audit_trail`` (auditors and admins); exporting needs
``audit.export_audit`` and running a verification or signing a digest ``audit.verify_audit``.
Writes go through ``audit.commands`` and ``audit.exports``, never straight to models.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from audit import access_review, commands, exports, integrity, keys, retention
from audit.actor import Actor
from audit.commands import sign_digest as sign
from audit.commands import verify_chain
from audit.digests import ChainBroken
from audit.export_api import download_response
from audit.forms import EXPORT_FORMS, TrailFilterForm
from audit.hashing import GENESIS_HASH, event_hash
from audit.models import Digest, Event, ExportJob
from audit.store import COLUMNS

VIEW = "audit.view_audit_trail"
EXPORT = "audit.export_audit"
VERIFY = "audit.verify_audit"
PAGE_SIZE = 50


def _needs(perm: str) -> Any:
    def wrap(view: Any) -> Any:
        return login_required(permission_required(perm, raise_exception=True)(view))

    return wrap


def _last_verification() -> dict[str, Any] | None:
    row = Event.objects.filter(type="audit.chain_verified").order_by("-position").first()
    if row is None:
        return None
    return {"event": row, **row.payload}


@require_GET
@_needs(VIEW)
def trail(request: HttpRequest) -> HttpResponse:
    form = TrailFilterForm(request.GET or None)
    qs = Event.objects.order_by("-position")
    if form.is_bound and form.is_valid():
        f = form.cleaned_data
        if f["actor"]:
            qs = qs.filter(actor_name=f["actor"])
        if f["type"]:
            qs = qs.filter(type=f["type"])
        if f["aggregate_type"]:
            qs = qs.filter(aggregate_type=f["aggregate_type"])
        if f["aggregate_id"]:
            qs = qs.filter(aggregate_id=f["aggregate_id"])
        if f["since"]:
            qs = qs.filter(recorded_at__gte=f["since"])
        if f["until"]:
            qs = qs.filter(recorded_at__lt=f["until"])
        if f["q"]:
            # data is the canonical JSON text, so a substring search covers keys and values.
            qs = qs.filter(data__icontains=f["q"])
    elif form.is_bound:
        qs = qs.none()
    page = Paginator(qs, PAGE_SIZE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    # Only the filters as validated are recorded; a bad query shows its errors and no events.
    applied = dict(form.cleaned_data) if form.is_bound and form.is_valid() else {}
    details = commands.read_details(applied | {"page": page.number}, page.object_list)
    if form.is_bound and not form.is_valid():
        details["invalid"] = sorted(form.errors)[:20]
    commands.record_trail_read(request, "dashboard.trail", details)
    return render(
        request,
        "audit/trail.html",
        {
            "form": form,
            "page": page,
            "query": query.urlencode(),
            "verification": _last_verification(),
            "open_break": integrity.known_break(),
            "section": "trail",
        },
    )


@require_GET
@_needs(VIEW)
def event_detail(request: HttpRequest, position: int) -> HttpResponse:
    event = get_object_or_404(Event, position=position)
    fields = {c: getattr(event, c) for c in COLUMNS}
    recomputed = event_hash(fields, event.data, event.prev_hash)
    previous = Event.objects.filter(position=position - 1).values_list("hash", flat=True).first()
    expected_prev = GENESIS_HASH if position == 1 else previous
    nxt = Event.objects.filter(position=position + 1).values_list("prev_hash", flat=True).first()
    verification = _last_verification()
    covered = bool(
        verification
        and verification.get("ok")
        and (verification.get("last_position") or 0) >= position
    )
    digest = Digest.objects.filter(start_position__lte=position, end_position__gte=position).first()
    commands.record_trail_read(request, "dashboard.event", {"position": position})
    return render(
        request,
        "audit/event.html",
        {
            "event": event,
            "data_pretty": json.dumps(event.payload, indent=2, ensure_ascii=False),
            "hash_ok": recomputed == event.hash,
            "link_ok": expected_prev is not None and expected_prev == event.prev_hash,
            "next_links": nxt is None or nxt == event.hash,
            "has_next": nxt is not None,
            "verification": verification,
            "open_break": integrity.known_break(),
            "covered": covered,
            "digest": digest,
            "section": "trail",
        },
    )


@require_POST
@_needs(VERIFY)
def verify(request: HttpRequest) -> HttpResponse:
    report = verify_chain(request)
    if report.ok:
        messages.success(
            request,
            f"Chain intact: {report.checked} events up to position {report.last_position}, "
            f"{report.digests_checked} signed digests valid.",
        )
    else:
        messages.error(request, f"Chain verification FAILED: {report.problem}")
    target = request.POST.get("next") or ""
    if not target.startswith("/audit/") or "//" in target:
        target = reverse("audit:trail")
    return redirect(target)


@require_GET
@_needs(VIEW)
def digests(request: HttpRequest) -> HttpResponse:
    page = Paginator(Digest.objects.order_by("-end_position"), PAGE_SIZE).get_page(
        request.GET.get("page")
    )
    return render(
        request,
        "audit/digests.html",
        {"page": page, "keys": keys.public_key_infos(), "section": "digests"},
    )


@require_POST
@_needs(VERIFY)
def sign_digest(request: HttpRequest) -> HttpResponse:
    try:
        digest = sign(request)
    except ChainBroken as exc:
        messages.error(request, f"Signing refused: the chain is broken: {exc.problem}.")
        return redirect("audit:digests")
    if digest is None:
        messages.info(request, "Nothing to sign: no events since the last digest.")
    else:
        messages.success(
            request,
            f"Signed positions {digest.start_position}..{digest.end_position} "
            f"({digest.algorithm}, {digest.key_id}).",
        )
    return redirect("audit:digests")


@require_GET
@_needs(VIEW)
def keys_json(request: HttpRequest) -> HttpResponse:
    response = JsonResponse({"keys": [k.as_dict() for k in keys.public_key_infos()]})
    response["Content-Disposition"] = 'attachment; filename="audit-public-keys.json"'
    return response


def _default_period() -> dict[str, str]:
    today = datetime.now(UTC).date()
    return {
        "since": (today - timedelta(days=30)).isoformat(),
        "until": (today + timedelta(days=1)).isoformat(),
    }


@_needs(VIEW)
def export_list(request: HttpRequest) -> HttpResponse:
    forms = {
        kind: cls(initial=_default_period() if kind != "archive" else {})
        for kind, cls in EXPORT_FORMS.items()
    }
    if request.method == "POST":
        if not request.user.has_perm(EXPORT):
            messages.error(request, "You need the export permission.")
            return redirect("audit:exports")
        kind = request.POST.get("kind", "")
        if kind not in EXPORT_FORMS:
            messages.error(request, "Unknown export kind.")
            return redirect("audit:exports")
        form = EXPORT_FORMS[kind](request.POST, prefix=None)
        forms[kind] = form
        if form.is_valid():
            try:
                req = exports.clean_request(kind, form.cleaned_data)
            except ValidationError as exc:
                for field, errors in exc.message_dict.items():
                    form.add_error(field if field in form.fields else None, errors)
            else:
                job = exports.request_export(Actor.from_request(request), request.user, req)
                return redirect("audit:export", pk=job.pk)
    jobs = ExportJob.objects.select_related("requested_by").order_by("-created_at")[:50]
    return render(
        request,
        "audit/exports.html",
        {
            "forms": forms,
            "jobs": jobs,
            "can_export": request.user.has_perm(EXPORT),
            "inline_max": settings.SANDBOX_AUDIT_INLINE_EXPORT_MAX,
            "section": "exports",
        },
    )


def _job_state(job: ExportJob) -> dict[str, Any]:
    return {
        "id": str(job.id),
        "status": job.status,
        "processed": job.processed,
        "total": job.total,
        "percent": job.percent,
        "error": job.error,
        "sha256": job.sha256,
        "size": job.size,
        "download_url": reverse("audit:export-download", args=[job.pk])
        if job.status == ExportJob.Status.DONE
        else None,
    }


@require_GET
@_needs(VIEW)
def export_detail(request: HttpRequest, pk: str) -> HttpResponse:
    job = get_object_or_404(ExportJob.objects.select_related("requested_by"), pk=pk)
    return render(
        request,
        "audit/export.html",
        {"job": job, "state": _job_state(job), "section": "exports"},
    )


@require_GET
@_needs(VIEW)
def export_status(request: HttpRequest, pk: str) -> JsonResponse:
    return JsonResponse(_job_state(get_object_or_404(ExportJob, pk=pk)))


@require_GET
@_needs(EXPORT)
def export_download(request: HttpRequest, pk: str) -> HttpResponse:
    job = get_object_or_404(ExportJob, pk=pk)
    path = exports.export_path(job)
    if job.status != ExportJob.Status.DONE or not path.exists():
        raise Http404("this export is not ready or no longer on this server")
    commands.record_export_downloaded(request, job)
    return download_response(job, path)


@require_GET
@_needs(VIEW)
def access(request: HttpRequest) -> HttpResponse:
    """Users, roles and API tokens (read-only), as the log states them now, and their changes
    in the last 90 days with who made them."""
    now = datetime.now(UTC)
    review = access_review.build(now, now - timedelta(days=90)).as_dict()
    commands.record_accounts_listed(
        request,
        "dashboard.access",
        {"users": len(review["users"]), "tokens": len(review["tokens"])},
    )
    return render(request, "audit/access.html", {"review": review, "section": "access"})


@_needs(VIEW)
def retention_status(request: HttpRequest) -> HttpResponse:
    """Retention period, legal holds (place and release with the export permission), archives."""
    if request.method == "POST":
        if not request.user.has_perm(EXPORT):
            messages.error(request, "You need the export permission.")
        elif request.POST.get("action") == "place":
            try:
                hold = commands.place_legal_hold(request, request.POST.get("reason", ""))
            except ValueError as exc:
                messages.error(request, str(exc))
            else:
                messages.success(request, f"Legal hold {hold} placed.")
        elif request.POST.get("action") == "release":
            try:
                released = commands.release_legal_hold(
                    request, request.POST.get("hold_id", ""), request.POST.get("reason", "")
                )
            except ValueError as exc:
                messages.error(request, str(exc))
            else:
                if released:
                    messages.success(request, "Legal hold released.")
                else:
                    messages.error(request, "No such active legal hold.")
        return redirect("audit:retention")
    return render(
        request,
        "audit/retention.html",
        {
            "status": retention.status(),
            "can_export": request.user.has_perm(EXPORT),
            "section": "retention",
        },
    )
