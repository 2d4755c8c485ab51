"""Export jobs: validate a request, produce the report or bundle, record ``audit.exported``.

One path for the API and the dashboard: ``clean_request`` turns raw input into an
``ExportRequest`` (or a ``ValidationError`` with field errors), ``request_export`` records a job
and either runs it inline (small periods, up to ``SANDBOX_AUDIT_INLINE_EXPORT_MAX`` events) or
enqueues ``audit.tasks.run_export`` on commit. ``run_export`` claims the job (so a redelivered
task does not run it twice), writes the file beside its final name and renames it when complete,
and appends ``audit.exported`` with the file's SHA-256 in the same transaction that marks the job
done: an export that was handed out is always in the log, and one in the log always exists.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils.dateparse import parse_date, parse_datetime
from django_q.tasks import async_task

from audit import bundle, commands, compliance, integrity, reports, retention
from audit.actor import Actor
from audit.hashing import format_time
from audit.models import Event, ExportJob

__all__ = [
    "KINDS",
    "REPORT_FORMATS",
    "ExportRequest",
    "clean_request",
    "chain_break",
    "export_path",
    "parse_time",
    "refused",
    "request_export",
    "run_export",
]

log = logging.getLogger("sandbox.audit.exports")

KINDS = ("report", "bundle", "archive")
REPORT_FORMATS = ("json", "csv", "pdf")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
REFUSED = "refused: the audit chain is broken: "


@dataclass(frozen=True)
class ExportRequest:
    kind: str
    format: str
    framework: str
    since: datetime
    until: datetime

    def params(self) -> dict[str, Any]:
        return {
            "since": format_time(self.since),
            "until": format_time(self.until),
            "framework": self.framework,
        }


def parse_time(value: Any, field: str, errors: dict[str, str]) -> datetime | None:
    """ISO 8601 date or date-time; a date means its midnight, a naive time means UTC."""
    if value in (None, ""):
        errors[field] = "this field is required (ISO 8601 date or date-time)"
        return None
    if isinstance(value, datetime):
        parsed: datetime | None = value
    elif isinstance(value, date):
        parsed = datetime(value.year, value.month, value.day, tzinfo=UTC)
    else:
        text = str(value).strip()
        try:
            parsed = parse_datetime(text)
            if parsed is None and (d := parse_date(text)) is not None:
                parsed = datetime(d.year, d.month, d.day, tzinfo=UTC)
        except ValueError:
            parsed = None
    if parsed is None:
        errors[field] = f"{value!r} is not an ISO 8601 date or date-time"
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def clean_request(kind: str, raw: Mapping[str, Any]) -> ExportRequest:
    """Validate an export request; ``ValidationError`` maps each bad field to its message."""
    errors: dict[str, str] = {}
    now = datetime.now(UTC)
    if kind not in KINDS:
        raise ValidationError({"kind": f"must be one of {', '.join(KINDS)}"})
    framework = ""
    fmt = "zip"
    if kind == "report":
        framework = str(raw.get("framework") or "")
        if framework not in compliance.FRAMEWORKS:
            errors["framework"] = f"must be one of {', '.join(compliance.FRAMEWORKS)}"
        fmt = str(raw.get("format") or "json")
        if fmt not in REPORT_FORMATS:
            errors["format"] = f"must be one of {', '.join(REPORT_FORMATS)}"
    if kind == "archive":
        before = parse_time(raw.get("before"), "before", errors)
        since, until = _EPOCH, before
        if before is not None and before > now:
            errors["before"] = "must not be in the future: an archive holds past events"
    else:
        since = parse_time(raw.get("since"), "since", errors)
        until = parse_time(raw.get("until"), "until", errors)
        if since is not None and until is not None and since >= until:
            errors["until"] = "must be after since"
        if since is not None and since > now:
            errors["since"] = "must not be in the future"
    if errors:
        raise ValidationError(errors)
    assert since is not None and until is not None
    if (
        kind != "report"
        and not Event.objects.filter(recorded_at__gte=since, recorded_at__lt=until).exists()
    ):
        field = "before" if kind == "archive" else "since"
        raise ValidationError({field: "no events were recorded in this period"})
    return ExportRequest(kind, fmt, framework, since, until)


def export_path(job: ExportJob) -> Path:
    return Path(settings.SANDBOX_AUDIT_EXPORT_DIR) / f"{job.id}.{job.format}"


def _download_name(req: ExportRequest) -> str:
    span = f"{req.since:%Y%m%dT%H%M%SZ}-{req.until:%Y%m%dT%H%M%SZ}"
    if req.kind == "report":
        return f"audit-report-{req.framework}-{span}.{req.format}"
    if req.kind == "archive":
        return f"audit-archive-before-{req.until:%Y%m%dT%H%M%SZ}.zip"
    return f"audit-bundle-{span}.zip"


def request_export(actor: Actor, user: Any, req: ExportRequest) -> ExportJob:
    """Record the job; run it now when small, else in the worker. Returns the job as it stands."""
    bounds = reports.period_bounds(req.since, req.until)
    total = bounds[2] if bounds else 0
    params = req.params() | {
        "request_id": actor.request_id,
        "channel": actor.channel,
        "source_ip": actor.source_ip,
        "token_id": actor.token_id,
    }
    job = ExportJob.objects.create(
        kind=req.kind,
        format=req.format,
        framework=req.framework,
        params=params,
        total=total,
        requested_by=user,
        created_at=datetime.now(UTC),
        file_name=_download_name(req),
    )
    if total <= settings.SANDBOX_AUDIT_INLINE_EXPORT_MAX:
        run_export(str(job.id))
        job.refresh_from_db()
    else:
        job_id = str(job.id)
        transaction.on_commit(
            lambda: async_task("audit.tasks.run_export", job_id, task_name=f"audit-export-{job_id}")
        )
    return job


def chain_break(since: datetime, until: datetime) -> str | None:
    """What is wrong with the log an export of [since, until) would rest on, or None.

    No break may be on record (``audit.integrity.known_break``: a failed verification or a
    refusal that no clean full verification or acknowledgement settled), whatever the period;
    and the period's range must be one the server can vouch for
    (``audit.integrity.check_range``: its events hash and link, its digests are signed by
    trusted keys and chained, the sink holds the newest digest): an export never states
    figures, or signs a bundle, over a log known or found to be broken.
    """
    found = integrity.known_break()
    if found is not None:
        return f"a break is on record: {found.chain_problem()}"
    bounds = reports.period_bounds(since, until)
    if bounds is None:
        return None
    problem = integrity.check_range(bounds[0], bounds[1])
    return str(problem) if problem is not None else None


def refused(job: ExportJob) -> bool:
    """Whether the job was refused because the chain is broken (see ``chain_break``)."""
    return job.status == ExportJob.Status.FAILED and job.error.startswith(REFUSED)


def _claim(job_id: str) -> ExportJob | None:
    """Mark the job running unless another run holds it (a stale run may be taken over)."""
    stale = datetime.now(UTC) - timedelta(seconds=int(settings.Q_CLUSTER["timeout"]) + 60)
    claimed = ExportJob.objects.filter(
        Q(status=ExportJob.Status.QUEUED)
        | Q(status=ExportJob.Status.RUNNING, started_at__lt=stale),
        pk=job_id,
    ).update(status=ExportJob.Status.RUNNING, started_at=datetime.now(UTC), processed=0)
    return ExportJob.objects.select_related("requested_by").get(pk=job_id) if claimed else None


def _actor_for(job: ExportJob) -> Actor:
    """The requesting user, as recorded when the job was asked for (the worker acts for them)."""
    user = job.requested_by
    p = job.params
    return Actor(
        kind="user",
        user_id=user.pk,
        username=user.get_username(),
        token_id=p.get("token_id") or "",
        channel=p.get("channel") or "worker",
        source_ip=p.get("source_ip"),
        request_id=p.get("request_id") or "",
    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def run_export(job_id: str) -> str:
    """Produce the job's file and record ``audit.exported``. Idempotent: returns the status."""
    job = _claim(job_id)
    if job is None:
        return ExportJob.objects.filter(pk=job_id).values_list("status", flat=True).first() or ""
    actor = _actor_for(job)
    since = datetime.fromisoformat(job.params["since"])
    until = datetime.fromisoformat(job.params["until"])
    problem = chain_break(since, until)
    if problem is not None:
        with transaction.atomic():
            commands.record_export_refused(
                actor,
                {
                    "job": str(job.id),
                    "kind": job.kind,
                    "format": job.format,
                    "framework": job.framework or None,
                    "since": job.params["since"],
                    "until": job.params["until"],
                    "problem": problem,
                },
            )
            ExportJob.objects.filter(pk=job.pk).update(
                status=ExportJob.Status.FAILED,
                finished_at=datetime.now(UTC),
                error=f"{REFUSED}{problem}"[:2000],
            )
        return ExportJob.Status.FAILED
    final = export_path(job)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_suffix(final.suffix + ".part")

    def progress(done: int) -> None:
        ExportJob.objects.filter(pk=job.pk).update(processed=done)

    try:
        data: dict[str, Any] = {
            "job": str(job.id),
            "kind": job.kind,
            "format": job.format,
            "framework": job.framework or None,
            "since": job.params["since"],
            "until": job.params["until"],
        }
        with partial.open("wb") as fh:
            if job.kind == "report":
                report = reports.build(
                    job.framework, since, until, generated_by=actor.username, progress=progress
                )
                {"json": reports.write_json, "csv": reports.write_csv, "pdf": reports.write_pdf}[
                    job.format
                ](report, fh)
                first, last, events = report.first_position, report.last_position, report.events
                data["exceptions"] = len(report.exceptions)
            else:
                # The range is fixed first, then the pending tail signed, so that the newest
                # events of the period are covered (the signing's own event comes after them).
                bounds = reports.period_bounds(since, until)
                if bounds is None:
                    raise ValueError("no events were recorded in this period")
                commands.sign_digest(actor)
                requested = dict(job.params)
                for private in ("request_id", "channel", "source_ip", "token_id"):
                    requested.pop(private, None)
                if job.kind == "archive":
                    limit = retention.cutoff()
                    requested |= {
                        "before": job.params["until"],
                        "retention_years": settings.SANDBOX_AUDIT_RETENTION_YEARS,
                        "retention_cutoff": format_time(limit),
                        "entirely_beyond_retention": until <= limit,
                    }
                    data["entirely_beyond_retention"] = until <= limit
                ExportJob.objects.filter(pk=job.pk).update(total=bounds[1] - bounds[0] + 1)
                info = bundle.write_bundle(
                    fh,
                    first=bounds[0],
                    last=bounds[1],
                    kind=job.kind,
                    requested=requested,
                    created_by=actor.username,
                    name=job.file_name,
                    progress=progress,
                )
                first, last, events = info.first_position, info.last_position, info.events
                data["digests"] = info.digests
            fh.flush()
            os.fsync(fh.fileno())
        sha, size = _file_sha256(partial), partial.stat().st_size
        os.replace(partial, final)
        # Write-once on this server: nothing in the product opens an export for writing again.
        final.chmod(0o444)
        data |= {
            "first_position": first,
            "last_position": last,
            "events": events,
            "sha256": sha,
            "size": size,
            "file": job.file_name,
        }
        commands.record_export_finished(actor, job.pk, data)
    except Exception as exc:
        log.exception("audit export failed", extra={"job": str(job.id)})
        partial.unlink(missing_ok=True)
        ExportJob.objects.filter(pk=job.pk).update(
            status=ExportJob.Status.FAILED,
            finished_at=datetime.now(UTC),
            error=f"{type(exc).__name__}: {exc}"[:2000],
        )
        return ExportJob.Status.FAILED
    return ExportJob.Status.DONE
