"""Compliance reports: the events of a period listed as the evidence of a framework's controls.

``build`` walks the log once, by position, between the first and last event of the period
(keyset batches; memory grows with the evidence only) and offers each event to every control
of the framework (``audit.compliance``): a control keeps the positions of the events its text
asks for, and each such event is kept once with the fields auditors read (event id, time, type,
actor, source address, subject). Exception rules flag events to look at; the access review
(``audit.access_review``) states users, roles and tokens at the period's end. Renderers write
the same report as JSON (complete), CSV (one row per figure, exception, evidence item and
access entry) and PDF (landscape tables whose columns fit their longest word).

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
from sys import intern
from typing import IO, Any

from django.db.models import Count, Max, Min

from audit import access_review, compliance, integrity, retention
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
PDF_EVIDENCE_ROWS = 200  # per control
PDF_RANGES_CHARS = 1800
PDF_MAX_WORD = 48
NO_EVIDENCE = "no evidence"


@dataclass(frozen=True, slots=True)
class Item:
    """One event counted as evidence by at least one control, with the fields auditors read."""

    position: int
    event_id: str
    type: str
    recorded_at: str
    actor: str
    actor_type: str
    token_id: str
    channel: str
    source_ip: str
    subject: str

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}


@dataclass
class ControlEvidence:
    positions: list[int] = field(default_factory=list)
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
    events: int = 0  # every event of the period, counted by a control or not
    by_type: Counter[str] = field(default_factory=Counter)
    evidence: dict[int, Item] = field(default_factory=dict)  # position -> item
    controls: dict[str, ControlEvidence] = field(default_factory=dict)
    exceptions: list[dict[str, Any]] = field(default_factory=list)
    verification: dict[str, Any] | None = None
    # Breaks an administrator acknowledged (audit.break_acknowledged): stated by every report.
    acknowledged_breaks: list[dict[str, Any]] = field(default_factory=list)
    oldest_event_at: datetime | None = None
    access: access_review.AccessReview | None = None

    def _exceptions_of(self, control: compliance.Control) -> list[dict[str, Any]]:
        positions = set(self.controls[control.id].positions)
        types = control.event_types
        counts_verification = types is not None and "audit.chain_verified" in types
        return [
            e
            for e in self.exceptions
            if (e["position"] in positions) or (e["position"] is None and counts_verification)
        ]

    def control_rows(self) -> list[dict[str, Any]]:
        rows = []
        for control in self.framework.controls:
            ev = self.controls[control.id]
            exc = Counter(e["kind"] for e in self._exceptions_of(control))
            events = len(ev.positions)
            n_exc = sum(exc.values())
            if not events:
                status = NO_EVIDENCE
            else:
                status = "exceptions" if n_exc else "evidenced"
            rows.append(
                {
                    "id": control.id,
                    "title": control.title,
                    "asks": control.asks,
                    "counts": control.counts,
                    "counted": [s.describe() for s in control.counted],
                    "manual_checks": control.manual,
                    "access_review": control.access_review,
                    "events": events,
                    "events_by_type": dict(sorted(ev.by_type.items())),
                    "exceptions": n_exc,
                    "exceptions_by_kind": dict(sorted(exc.items())),
                    "status": status,
                    "evidence": list(ev.positions),
                }
            )
        return rows

    def exception_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(e["kind"] for e in self.exceptions).items()))

    def as_dict(self, *, evidence: bool = True) -> dict[str, Any]:
        controls = self.control_rows()
        if not evidence:
            for c in controls:
                c.pop("evidence")
        out: dict[str, Any] = {
            "report": "compliance",
            "format_version": 2,
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
            "acknowledged_breaks": self.acknowledged_breaks,
            "verification": self.verification,
            "retention": retention.summary(oldest_event_at=self.oldest_event_at),
            "controls": controls,
            "exception_counts": self.exception_counts(),
            "exceptions": self.exceptions,
            "access_review": self.access.as_dict() if self.access else None,
        }
        if evidence:
            out["evidence"] = [self.evidence[p].as_dict() for p in sorted(self.evidence)]
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
        controls={c.id: ControlEvidence() for c in framework.controls},
    )
    report.verification = _last_verification(until)
    report.acknowledged_breaks = integrity.acknowledged_breaks()
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
                parsed: list[dict[str, Any]] = []

                def data(e: Any = e, parsed: list[dict[str, Any]] = parsed) -> dict[str, Any]:
                    if not parsed:
                        parsed.append(e.data)
                    return parsed[0]

                counted = False
                for control in framework.controls:
                    if control.counts_event(e.type, data, e.actor_type):
                        ev = report.controls[control.id]
                        ev.positions.append(e.position)
                        ev.by_type[e.type] += 1
                        counted = True
                if counted:
                    # Kept for every counted event of the period: the values that repeat
                    # across events are shared (interned) so a long period stays affordable.
                    report.evidence[e.position] = Item(
                        e.position,
                        e.event_id,
                        intern(e.type),
                        format_time(e.recorded_at),
                        intern(e.actor_name),
                        intern(e.actor_type),
                        intern(e.token_id),
                        intern(e.channel),
                        intern(e.source_ip),
                        f"{e.aggregate_type}:{e.aggregate_id}",
                    )
                if e.type == "audit.chain_verified":
                    verified_in_period = True
                for rule in compliance.RULES_BY_TYPE.get(e.type, ()):
                    detail = rule.match(e.type, data())
                    if detail is not None:
                        report.exceptions.append(
                            {
                                "kind": rule.kind,
                                "title": rule.title,
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
    report.access = access_review.build(until, since)
    return report


# --- Renderers ---------------------------------------------------------------------------------


def write_json(report: Report, fh: IO[bytes]) -> None:
    fh.write(json.dumps(report.as_dict(), indent=1, ensure_ascii=False).encode())


CSV_COLUMNS = (
    "record",
    "control",
    "kind",
    "event_type",
    "count",
    "position",
    "event_id",
    "recorded_at",
    "actor",
    "source_ip",
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
    r = d["retention"]
    row(
        record="retention",
        count=r["years"],
        recorded_at=r["oldest_event_at"] or "",
        detail=f"{r['years']} calendar years; cut-off {r['cutoff']}; pruning {r['pruning']}; "
        f"active legal holds: {len(r['legal_holds'])}",
    )
    for b in report.acknowledged_breaks:
        row(
            record="acknowledged_break",
            kind=b["kind"],
            position=b["position"],
            event_id=b["event_id"],
            recorded_at=b["recorded_at"],
            actor=b["acknowledged_by"],
            detail=f"THE LOG IS BROKEN at position {b['position']}: {b['problem']}; "
            f"acknowledged by {b['acknowledged_by']}: {b['reason']}",
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
            kind=e["kind"],
            event_type=e["type"] or "",
            position=e["position"] or "",
            event_id=e["event_id"] or "",
            recorded_at=e["recorded_at"] or "",
            actor=e["actor"] or "",
            source_ip=e["source_ip"] or "",
            subject=e["subject"] or "",
            detail=e["detail"],
        )
    for control in report.framework.controls:
        for p in report.controls[control.id].positions:
            item = report.evidence[p]
            row(
                record="evidence",
                control=control.id,
                event_type=item.type,
                position=p,
                event_id=item.event_id,
                recorded_at=item.recorded_at,
                actor=item.actor,
                source_ip=item.source_ip,
                subject=item.subject,
            )
    if report.access is not None:
        review = report.access.as_dict()
        for u in review["users"]:
            row(
                record="access_user",
                kind=u["role"],
                subject=f"user:{u['user_id']}",
                actor=u["username"],
                recorded_at=u["created_at"],
                detail=("active" if u["active"] else "inactive")
                + ("; superuser" if u["superuser"] else "")
                + f"; created by {u['created_by']}",
            )
        for role in review["roles"]:
            row(
                record="access_role",
                kind=role["role"],
                count=len(role["members"]),
                detail="members: "
                + (", ".join(role["members"]) or "none")
                + "; permissions: "
                + (", ".join(role["permissions"]) or "none"),
            )
        for t in review["tokens"]:
            row(
                record="access_token",
                kind="active" if t["active"] else "inactive",
                subject=f"token:{t['token_id']}",
                actor=t["username"],
                recorded_at=t["created_at"],
                detail=f"{t['name']}; scopes: {', '.join(t['scopes']) or 'all'}; "
                f"{'read-only' if t['read_only'] else 'read-write'}; "
                f"allowed: {', '.join(t['allowed_ips']) or 'any'}; "
                f"expires {t['expires_at'] or 'never'}; "
                f"revoked {t['revoked_at'] or 'no'}",
            )
        for ch in review["changes"]:
            row(
                record="access_change",
                event_type=ch["type"],
                position=ch["position"],
                event_id=ch["event_id"],
                recorded_at=ch["recorded_at"],
                actor=ch["by"],
                source_ip=ch["source_ip"],
                subject=ch["subject"],
                detail=ch["detail"],
            )
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


def _pdf_text(text: Any) -> str:
    """Latin-1 text whose words are at most PDF_MAX_WORD characters: a longer word (only
    user-controlled text has one) is shortened with '...', never broken across lines."""
    words = _latin1(text).split(" ")
    return " ".join(w if len(w) <= PDF_MAX_WORD else w[: PDF_MAX_WORD - 3] + "..." for w in words)


def _column_needs(pdf: Any, rows: list[list[str]], pad: float) -> tuple[list[float], list[float]]:
    """Per column: the width of its longest word, and of its longest cell, padding included."""
    slack = 2 * pad + 2 * pdf.c_margin + 0.6
    n = len(rows[0])
    need = [0.0] * n
    natural = [0.0] * n
    for r in rows:
        for i, cell in enumerate(r):
            words = cell.split() or [""]
            need[i] = max(need[i], max(pdf.get_string_width(w) for w in words) + slack)
            natural[i] = max(natural[i], pdf.get_string_width(cell) + slack)
    return need, natural


def _column_widths(pdf: Any, rows: list[list[str]], width: float, pad: float) -> list[float]:
    """Widths that hold each column's longest word on one line, the rest shared out by need.

    fpdf2 wraps a cell at spaces, but a word wider than its column is cut between letters
    (``bootstrap_admi`` / ``n``); sizing every column to its longest word prevents that.
    ``ValueError`` when the longest words alone are wider than ``width``.
    """
    need, natural = _column_needs(pdf, rows, pad)
    n = len(need)
    if sum(need) > width:
        raise ValueError("columns do not fit")
    extra = width - sum(need)
    want = [max(0.0, natural[i] - need[i]) for i in range(n)]
    total = sum(want)
    if total <= extra:
        return [natural[i] if want[i] else need[i] for i in range(n)]
    return [need[i] + extra * want[i] / total for i in range(n)]


def write_pdf(report: Report, fh: IO[bytes]) -> None:
    # Here, not at the top: fpdf2 and its fonts load only in a process that writes a PDF.
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

    pdf = PDF(orientation="landscape", unit="mm", format="A4")
    pdf.set_title(_latin1(f"{report.framework.name}: audit evidence report"))
    pdf.set_author("MicroVM Sandbox")
    pdf.set_creation_date(report.generated_at)
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    head = FontFace(emphasis="BOLD", fill_color=(225, 230, 240))
    pad = 1.0

    def h1(text: str) -> None:
        pdf.set_font("Helvetica", "B", 15)
        pdf.multi_cell(0, 8, _latin1(text), new_x="LMARGIN", new_y="NEXT")

    def h2(text: str) -> None:
        pdf.ln(3)
        pdf.set_font("Helvetica", "B", 11)
        pdf.multi_cell(0, 6, _latin1(text), new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", size=8)

    def para(text: str, style: str = "") -> None:
        pdf.set_font("Helvetica", style, size=8)
        pdf.multi_cell(0, 4.2, _pdf_text(text), new_x="LMARGIN", new_y="NEXT")

    def table(headings: list[str], rows: list[list[Any]], *, size: float = 7) -> None:
        cells = [headings] + [[_pdf_text(c) for c in r] for r in rows]
        width = pdf.epw - 0.01
        while True:
            pdf.set_font("Helvetica", size=size)
            try:
                widths = _column_widths(pdf, cells, width, pad)
            except ValueError:
                if size > 5:
                    size -= 0.5  # many wide columns: a smaller font, never below legible
                    continue
                # Only user-controlled words (48 wide letters in every column) get here: share
                # the page by need rather than fail the export; such a word may then wrap.
                need = _column_needs(pdf, cells, pad)[0]
                widths = [w * width / sum(need) for w in need]
            break
        with pdf.table(
            col_widths=widths,
            width=sum(widths),
            align="LEFT",
            headings_style=head,
            line_height=size * 0.5,
            padding=pad,
            text_align="LEFT",
        ) as t:
            for r in cells:
                t.row(r)

    h1(f"{report.framework.name}: audit evidence report")
    r = d["retention"]
    para(
        f"Period: {d['period']['since']} to {d['period']['until']} (end excluded)\n"
        f"Generated: {d['generated_at']} by {report.generated_by or '-'}\n"
        f"Events in period: {report.events} (positions {report.first_position or '-'}.."
        f"{report.last_position or '-'})\n"
        f"Retention: {r['years']} calendar years (cut-off {r['cutoff']}); oldest event "
        f"{r['oldest_event_at'] or '-'}; pruning {r['pruning']}; active legal holds: "
        f"{len(r['legal_holds'])}"
    )
    for b in report.acknowledged_breaks:
        para(
            f"THE LOG IS BROKEN at position {b['position']} ({b['kind']}): {b['problem']}. "
            f"Acknowledged by {b['acknowledged_by']} at {b['recorded_at']} (event "
            f"#{b['event_position']}): {b['reason']}",
            "B",
        )
    v = report.verification
    if v is None:
        para("Chain verification: none recorded before the end of the period.")
    else:
        state = "INTACT" if v["ok"] else f"FAILED: {v['problem']}"
        para(
            f"Last chain verification: {state}; {v['checked']} events up to position "
            f"{v['last_position']} (event #{v['position']} {v['event_id']}, {v['recorded_at']})"
        )
    para(
        "Every figure is counted from the tamper-evident event log. An evidence bundle of the "
        "same period verifies offline with: python -m audit.offline verify bundle.zip"
    )

    h2("Controls")
    table(
        ["Control", "Title", "Events", "Exceptions", "Status"],
        [
            [c["id"], c["title"], str(c["events"]), str(c["exceptions"]), c["status"]]
            for c in d["controls"]
        ],
        size=8,
    )

    for c in d["controls"]:
        h2(f"{c['id']} {c['title']}: {c['status']}")
        para(f"Asks: {c['asks']}")
        para(f"Counted: {c['counts']}")
        para(f"Check by hand: {c['manual_checks']}")
        if c["access_review"]:
            para("The access review at the end of this report is evidence of this control too.")
        if not c["events"]:
            para("No evidence: no event of the period is of a kind this control counts.", "B")
            continue
        table(
            ["Event type", "Count"],
            [[t, str(n)] for t, n in c["events_by_type"].items()],
        )
        if c["exceptions_by_kind"]:
            para("Exceptions: " + ", ".join(f"{k} {n}" for k, n in c["exceptions_by_kind"].items()))
        positions = report.controls[c["id"]].positions
        shown = positions[:PDF_EVIDENCE_ROWS]
        pdf.ln(1)
        table(
            ["Position", "Event id", "Time (UTC)", "Type", "Actor", "Source address", "Subject"],
            [
                [
                    str(p),
                    report.evidence[p].event_id,
                    report.evidence[p].recorded_at[:19].replace("T", " "),
                    report.evidence[p].type,
                    report.evidence[p].actor or "-",
                    report.evidence[p].source_ip or "-",
                    report.evidence[p].subject,
                ]
                for p in shown
            ],
        )
        if len(positions) > len(shown):
            rest = compact_ranges(positions[len(shown) :])
            if len(rest) > PDF_RANGES_CHARS:
                cut = rest.rfind(", ", 0, PDF_RANGES_CHARS)
                rest = rest[:cut] + " ..."
            para(
                f"... and {len(positions) - len(shown)} more at positions {rest}: every item, "
                "with its event id, is in the JSON and CSV exports of this report."
            )

    h2(f"Exceptions ({len(report.exceptions)})")
    if not report.exceptions:
        para("None.")
    else:
        table(
            [
                "Kind",
                "Position",
                "Event id",
                "Time (UTC)",
                "Actor",
                "Source address",
                "Subject",
                "Detail",
            ],
            [
                [
                    e["kind"],
                    str(e["position"] or "-"),
                    e["event_id"] or "-",
                    (e["recorded_at"] or "-")[:19].replace("T", " "),
                    e["actor"] or "-",
                    e["source_ip"] or "-",
                    e["subject"] or "-",
                    e["detail"],
                ]
                for e in report.exceptions[:PDF_EXCEPTION_ROWS]
            ],
            size=6.5,
        )
        if len(report.exceptions) > PDF_EXCEPTION_ROWS:
            para(
                f"... and {len(report.exceptions) - PDF_EXCEPTION_ROWS} more: every exception is "
                "listed in the JSON and CSV exports of this report."
            )

    review = d["access_review"]
    if review is not None:
        h2(f"Access review at {review['at']}")
        para("Users, roles and API tokens as the log states them at the end of the period.")
        table(
            ["User", "Role", "Superuser", "Active", "Created (UTC)", "Created by"],
            [
                [
                    u["username"],
                    u["role"] or "-",
                    "yes" if u["superuser"] else "no",
                    "yes" if u["active"] else "no",
                    u["created_at"][:19].replace("T", " "),
                    u["created_by"] or "-",
                ]
                for u in review["users"]
            ]
            or [["-", "-", "-", "-", "-", "-"]],
        )
        pdf.ln(1)
        table(
            ["Role", "Members", "Permissions"],
            [
                [
                    role["role"],
                    ", ".join(role["members"]) or "-",
                    ", ".join(role["permissions"]) or "-",
                ]
                for role in review["roles"]
            ]
            or [["-", "-", "-"]],
            size=6.5,
        )
        pdf.ln(1)
        table(
            [
                "Token",
                "Name",
                "User",
                "Scopes",
                "Read-only",
                "Allowed addresses",
                "Expires",
                "Active",
            ],
            [
                [
                    t["token_id"],
                    t["name"],
                    t["username"],
                    ", ".join(t["scopes"]) or "all of the user's",
                    "yes" if t["read_only"] else "no",
                    ", ".join(t["allowed_ips"]) or "any",
                    (t["expires_at"] or "never")[:19].replace("T", " "),
                    "yes" if t["active"] else "no",
                ]
                for t in review["tokens"]
            ]
            or [["-"] * 8],
        )
        h2(f"Grants and revocations in the period ({len(review['changes'])})")
        if review["changes"]:
            table(
                ["Position", "Event id", "Time (UTC)", "Change", "By", "Source address"],
                [
                    [
                        str(ch["position"]),
                        ch["event_id"],
                        ch["recorded_at"][:19].replace("T", " "),
                        ch["detail"],
                        ch["by"] or "-",
                        ch["source_ip"] or "-",
                    ]
                    for ch in review["changes"][:PDF_EXCEPTION_ROWS]
                ],
            )
        else:
            para("None.")
    pdf.output(fh)  # type: ignore[call-overload]  # any binary file object will do
