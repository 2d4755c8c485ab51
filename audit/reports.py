"""Compliance reports: the events of a period folded into a framework's controls.

``build`` walks the log once, by position, between the first and last event of the period
(keyset batches, constant memory apart from the evidence list) and counts every event into its
evidence area (``audit.compliance``), keeps each event's position and id as evidence, and
applies the exception rules. Renderers write the same report as JSON (complete), CSV (one row
per figure, exception and evidence item) and PDF (summary, exceptions, evidence as position
ranges; the complete lists are in the JSON and CSV).

Figures are computed from the events alone, never from read models, so a report is right for
whatever the rest of the product records, and the same period always gives the same figures.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

from django.conf import settings
from django.db.models import Count, Max, Min

from audit import compliance
from audit.hashing import format_time
from audit.models import Event
from audit.store import iter_events

__all__ = [
    "Report",
    "build",
    "compact_ranges",
    "period_bounds",
    "write_csv",
    "write_json",
    "write_pdf",
]

Progress = Callable[[int], None]
PDF_EXCEPTION_ROWS = 300  # beyond this the PDF says where the rest is
PDF_RANGES_CHARS = 1800


@dataclass
class Evidence:
    """Positions, ids and types of the events of one area, in position order."""

    positions: list[int] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    by_type: Counter[str] = field(default_factory=Counter)


@dataclass
class Report:
    framework: compliance.Framework
    since: datetime
    until: datetime
    generated_at: datetime
    generated_by: str
    first_position: int | None = None
    last_position: int | None = None
    events: int = 0  # every event of the period, including those of no area
    by_type: Counter[str] = field(default_factory=Counter)
    areas: dict[str, Evidence] = field(default_factory=dict)
    exceptions: list[dict[str, Any]] = field(default_factory=list)
    verification: dict[str, Any] | None = None
    oldest_event_at: datetime | None = None

    def area_count(self, area: str) -> int:
        return sum(self.areas[area].by_type.values()) if area in self.areas else 0

    def control_rows(self) -> list[dict[str, Any]]:
        kinds = Counter((e["area"], e["kind"]) for e in self.exceptions)
        rows = []
        for control in self.framework.controls:
            by_type: Counter[str] = Counter()
            for area in control.areas:
                if area in self.areas:
                    by_type.update(self.areas[area].by_type)
            exc = Counter({kind: n for (area, kind), n in kinds.items() if area in control.areas})
            events = sum(by_type.values())
            n_exc = sum(exc.values())
            status = "exceptions" if n_exc else ("evidenced" if events else "no activity")
            rows.append(
                {
                    "id": control.id,
                    "title": control.title,
                    "evidence": control.evidence,
                    "areas": list(control.areas),
                    "events": events,
                    "events_by_type": dict(sorted(by_type.items())),
                    "exceptions": n_exc,
                    "exceptions_by_kind": dict(sorted(exc.items())),
                    "status": status,
                }
            )
        return rows

    def exception_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(e["kind"] for e in self.exceptions).items()))

    def as_dict(self, *, evidence: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "report": "compliance",
            "format_version": 1,
            "framework": {"key": self.framework.key, "name": self.framework.name},
            "period": {"since": format_time(self.since), "until": format_time(self.until)},
            "generated_at": format_time(self.generated_at),
            "generated_by": self.generated_by,
            "log": {
                "first_position": self.first_position,
                "last_position": self.last_position,
                "events": self.events,
                "events_by_type": dict(sorted(self.by_type.items())),
            },
            "verification": self.verification,
            "retention": {
                "days": settings.SANDBOX_AUDIT_RETENTION_DAYS,
                "oldest_event_at": format_time(self.oldest_event_at)
                if self.oldest_event_at
                else None,
            },
            "controls": self.control_rows(),
            "exception_counts": self.exception_counts(),
            "exceptions": self.exceptions,
            "areas": {},
        }
        for name, area in compliance.AREAS.items():
            ev = self.areas.get(name, Evidence())
            entry: dict[str, Any] = {
                "title": area.title,
                "events": sum(ev.by_type.values()),
                "events_by_type": dict(sorted(ev.by_type.items())),
            }
            if evidence:
                entry["evidence"] = [
                    {"position": p, "event_id": i, "type": t}
                    for p, i, t in zip(ev.positions, ev.event_ids, ev.types, strict=True)
                ]
            out["areas"][name] = entry
        return out


def period_bounds(since: datetime, until: datetime) -> tuple[int, int, int] | None:
    """(first position, last position, events) of the events recorded in [since, until)."""
    agg = Event.objects.filter(recorded_at__gte=since, recorded_at__lt=until).aggregate(
        first=Min("position"), last=Max("position"), n=Count("position")
    )
    if not agg["n"]:
        return None
    return agg["first"], agg["last"], agg["n"]


def _last_verification(until: datetime) -> dict[str, Any] | None:
    row = (
        Event.objects.filter(type="audit.chain_verified", recorded_at__lt=until)
        .order_by("-position")
        .values("position", "event_id", "recorded_at", "data")
        .first()
    )
    if row is None:
        return None
    data = json.loads(row["data"])
    return {
        "position": row["position"],
        "event_id": str(row["event_id"]),
        "recorded_at": format_time(row["recorded_at"]),
        "ok": data.get("ok"),
        "checked": data.get("checked"),
        "last_position": data.get("last_position"),
        "problem": data.get("problem"),
    }


def build(
    framework_key: str,
    since: datetime,
    until: datetime,
    *,
    generated_by: str = "",
    progress: Progress | None = None,
    bounds: tuple[int, int, int] | None = None,
) -> Report:
    """Fold the events recorded in [since, until) into ``framework_key``'s controls."""
    framework = compliance.FRAMEWORKS[framework_key]
    report = Report(
        framework=framework,
        since=since,
        until=until,
        generated_at=datetime.now(UTC),
        generated_by=generated_by,
        areas={name: Evidence() for name in compliance.AREAS},
    )
    report.verification = _last_verification(until)
    report.oldest_event_at = (
        Event.objects.order_by("position").values_list("recorded_at", flat=True).first()
    )
    bounds = bounds if bounds is not None else period_bounds(since, until)
    verified_in_period = False
    if bounds is not None:
        first, last, _ = bounds
        done = 0
        for batch in iter_events(first - 1, until=last, batch=5000):
            for e in batch:
                # Positions follow commit order and times are taken under the append lock, so
                # they agree; the check keeps the report exact even if a clock stepped back.
                if not (since <= e.recorded_at < until):
                    continue
                report.events += 1
                report.by_type[e.type] += 1
                if report.first_position is None:
                    report.first_position = e.position
                report.last_position = e.position
                area = compliance.area_of_type(e.type)
                if area is not None:
                    ev = report.areas[area]
                    ev.positions.append(e.position)
                    ev.event_ids.append(e.event_id)
                    ev.types.append(e.type)
                    ev.by_type[e.type] += 1
                if e.type == "audit.chain_verified":
                    verified_in_period = True
                rules = compliance.RULES_BY_TYPE.get(e.type)
                if rules:
                    data = e.data
                    for rule in rules:
                        detail = rule.match(e.type, data)
                        if detail is not None:
                            report.exceptions.append(
                                {
                                    "kind": rule.kind,
                                    "title": rule.title,
                                    "area": rule.area,
                                    "position": e.position,
                                    "event_id": e.event_id,
                                    "type": e.type,
                                    "recorded_at": format_time(e.recorded_at),
                                    "actor": e.actor_name,
                                    "source_ip": e.source_ip,
                                    "subject": f"{e.aggregate_type}:{e.aggregate_id}",
                                    "detail": detail,
                                }
                            )
            done += len(batch)
            if progress is not None:
                progress(done)
    if not verified_in_period:
        rule = compliance.NO_VERIFICATION
        report.exceptions.append(
            {
                "kind": rule.kind,
                "title": rule.title,
                "area": rule.area,
                "position": None,
                "event_id": None,
                "type": None,
                "recorded_at": None,
                "actor": None,
                "source_ip": None,
                "subject": None,
                "detail": rule.match("", {}),
            }
        )
    return report


# --- Renderers ---------------------------------------------------------------------------------


def write_json(report: Report, fh: IO[bytes]) -> None:
    fh.write(json.dumps(report.as_dict(), indent=1, ensure_ascii=False).encode())


CSV_COLUMNS = (
    "record",
    "control",
    "area",
    "kind",
    "event_type",
    "count",
    "position",
    "event_id",
    "recorded_at",
    "actor",
    "subject",
    "detail",
)


def _csv_safe(value: Any) -> Any:
    # A cell starting with = + - @ is a formula to spreadsheets: event data is user-controlled.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def write_csv(report: Report, fh: IO[bytes]) -> None:
    text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
    out = csv.writer(text)
    out.writerow(CSV_COLUMNS)

    def row(**values: Any) -> None:
        out.writerow([_csv_safe(values.get(c, "")) for c in CSV_COLUMNS])

    d = report.as_dict(evidence=False)
    row(
        record="report",
        detail=f"{d['framework']['name']}; period {d['period']['since']} .. "
        f"{d['period']['until']}; generated {d['generated_at']} by {d['generated_by']}",
        count=report.events,
        position=f"{report.first_position or ''}..{report.last_position or ''}",
    )
    if report.verification:
        v = report.verification
        row(
            record="verification",
            kind="ok" if v["ok"] else "failed",
            position=v["position"],
            event_id=v["event_id"],
            recorded_at=v["recorded_at"],
            detail=v["problem"] or f"{v['checked']} events checked up to {v['last_position']}",
        )
    for c in d["controls"]:
        row(
            record="control",
            control=c["id"],
            kind=c["status"],
            count=c["events"],
            detail=c["title"],
        )
        for event_type, n in c["events_by_type"].items():
            row(record="control_events", control=c["id"], event_type=event_type, count=n)
        for kind, n in c["exceptions_by_kind"].items():
            row(record="control_exceptions", control=c["id"], kind=kind, count=n)
    for e in report.exceptions:
        row(
            record="exception",
            area=e["area"],
            kind=e["kind"],
            event_type=e["type"] or "",
            position=e["position"] or "",
            event_id=e["event_id"] or "",
            recorded_at=e["recorded_at"] or "",
            actor=e["actor"] or "",
            subject=e["subject"] or "",
            detail=e["detail"],
        )
    for name, ev in report.areas.items():
        for p, i, t in zip(ev.positions, ev.event_ids, ev.types, strict=True):
            out.writerow(["evidence", "", name, "", t, "", p, i, "", "", "", ""])
    text.flush()
    text.detach()


def compact_ranges(positions: Iterable[int]) -> str:
    """1,2,3,5,7,8 -> '1-3, 5, 7-8' (positions ascending)."""
    parts: list[str] = []
    start = prev = None
    for p in positions:
        if prev is not None and p == prev + 1:
            prev = p
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = p
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ", ".join(parts)


def _latin1(text: Any) -> str:
    # The PDF's core fonts are Latin-1; JSON and CSV keep the exact text.
    return str(text if text is not None else "").encode("latin-1", "replace").decode("latin-1")


def write_pdf(report: Report, fh: IO[bytes]) -> None:
    from fpdf import FPDF
    from fpdf.fonts import FontFace

    d = report.as_dict(evidence=False)

    class PDF(FPDF):
        def footer(self) -> None:
            self.set_y(-12)
            self.set_font("Helvetica", size=7)
            self.set_text_color(110)
            self.cell(
                0,
                5,
                _latin1(
                    f"{report.framework.name} | {d['period']['since']} .. {d['period']['until']}"
                    f" | positions {report.first_position or '-'}..{report.last_position or '-'}"
                    f" | page {self.page_no()}/{{nb}}"
                ),
                align="C",
            )

    pdf = PDF(orientation="portrait", unit="mm", format="A4")
    pdf.set_title(_latin1(f"{report.framework.name}: audit evidence report"))
    pdf.set_author("MicroVM Sandbox")
    pdf.set_creation_date(report.generated_at)
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    head = FontFace(emphasis="BOLD", fill_color=(225, 230, 240))

    def h1(text: str) -> None:
        pdf.set_font("Helvetica", "B", 15)
        pdf.multi_cell(0, 8, _latin1(text), new_x="LMARGIN", new_y="NEXT")

    def h2(text: str) -> None:
        pdf.ln(3)
        pdf.set_font("Helvetica", "B", 11)
        pdf.multi_cell(0, 6, _latin1(text), new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", size=8)

    def para(text: str) -> None:
        pdf.set_font("Helvetica", size=8)
        pdf.multi_cell(0, 4.2, _latin1(text), new_x="LMARGIN", new_y="NEXT")

    h1(f"{report.framework.name}: audit evidence report")
    para(
        f"Period: {d['period']['since']} to {d['period']['until']} (end excluded)\n"
        f"Generated: {d['generated_at']} by {report.generated_by or '-'}\n"
        f"Events in period: {report.events} (positions {report.first_position or '-'}.."
        f"{report.last_position or '-'})\n"
        f"Retention: {settings.SANDBOX_AUDIT_RETENTION_DAYS} days; oldest event "
        f"{d['retention']['oldest_event_at'] or '-'}"
    )
    v = report.verification
    if v is None:
        para("Chain verification: none recorded before the end of the period.")
    else:
        state = "INTACT" if v["ok"] else f"FAILED: {v['problem']}"
        para(
            f"Last chain verification: {state}; {v['checked']} events up to position "
            f"{v['last_position']} (event #{v['position']}, {v['recorded_at']})"
        )
    para(
        "Every figure is counted from the tamper-evident event log. An evidence bundle of the "
        "same period verifies offline with: python -m audit.offline verify bundle.zip"
    )

    h2("Controls")
    with pdf.table(
        col_widths=(22, 70, 18, 20, 24),
        headings_style=head,
        text_align=("LEFT", "LEFT", "RIGHT", "RIGHT", "LEFT"),
        line_height=4.5,
    ) as table:
        table.row(["Control", "Title", "Events", "Exceptions", "Status"])
        for c in d["controls"]:
            table.row(
                [
                    _latin1(c["id"]),
                    _latin1(c["title"]),
                    str(c["events"]),
                    str(c["exceptions"]),
                    c["status"],
                ]
            )

    for c in d["controls"]:
        h2(f"{c['id']} {c['title']}")
        para(f"{c['evidence']} Evidence areas: {', '.join(c['areas'])}.")
        if c["events_by_type"]:
            with pdf.table(
                col_widths=(90, 20), width=110, align="LEFT", headings_style=head, line_height=4
            ) as table:
                table.row(["Event type", "Count"])
                for event_type, n in c["events_by_type"].items():
                    table.row([event_type, str(n)])
        if c["exceptions_by_kind"]:
            para("Exceptions: " + ", ".join(f"{k} {n}" for k, n in c["exceptions_by_kind"].items()))

    h2(f"Exceptions ({len(report.exceptions)})")
    if not report.exceptions:
        para("None.")
    else:
        with pdf.table(
            col_widths=(30, 14, 32, 22, 30, 62), headings_style=head, line_height=4
        ) as table:
            table.row(["Kind", "Position", "Time (UTC)", "Actor", "Subject", "Detail"])
            for e in report.exceptions[:PDF_EXCEPTION_ROWS]:
                table.row(
                    [
                        e["kind"],
                        str(e["position"] or "-"),
                        (e["recorded_at"] or "-")[:19],
                        _latin1(e["actor"] or "-")[:30],
                        _latin1(e["subject"] or "-")[:40],
                        _latin1(e["detail"])[:160],
                    ]
                )
        if len(report.exceptions) > PDF_EXCEPTION_ROWS:
            para(
                f"... and {len(report.exceptions) - PDF_EXCEPTION_ROWS} more: every exception is "
                "listed in the JSON and CSV exports of this report."
            )

    h2("Evidence by area (event positions)")
    for name, area in compliance.AREAS.items():
        ev = report.areas[name]
        pdf.set_font("Helvetica", "B", 8)
        pdf.multi_cell(
            0,
            4.5,
            _latin1(f"{area.title}: {len(ev.positions)} events"),
            new_x="LMARGIN",
            new_y="NEXT",
        )
        if ev.positions:
            ranges = compact_ranges(ev.positions)
            if len(ranges) > PDF_RANGES_CHARS:
                cut = ranges.rfind(", ", 0, PDF_RANGES_CHARS)
                ranges = ranges[:cut] + " ... (complete list with event ids in JSON/CSV)"
            para(ranges)
    pdf.output(fh)
