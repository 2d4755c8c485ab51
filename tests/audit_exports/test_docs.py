"""docs/audit-exports.md says what exists: every auditor API route, console replays, retention."""

from __future__ import annotations

import re
from pathlib import Path

from django.urls import URLPattern, URLResolver

from audit import urls

DOC = (Path(__file__).resolve().parents[2] / "docs" / "audit-exports.md").read_text()


def _not_there_yet() -> str:
    return DOC.split("## What is not there yet", 1)[1]


def test_console_replays_are_not_listed_as_missing() -> None:
    from django.urls import reverse

    assert reverse("recordings:replay", args=[1])  # the replay exists
    assert "replay" not in _not_there_yet().lower()
    assert "Console sessions" in DOC and "replayed" in DOC


def test_every_auditor_api_route_is_documented() -> None:
    def routes(patterns: list, prefix: str = "") -> list[str]:
        out = []
        for p in patterns:
            if isinstance(p, URLResolver):
                out += routes(p.url_patterns, prefix + str(p.pattern))
            elif isinstance(p, URLPattern):
                out.append(prefix + str(p.pattern))
        return out

    for route in routes(urls.urlpatterns):
        first = re.sub(r"[\^$]", "", route).split("/")[0]
        if first and "(" not in first:
            assert f"/api/v1/audit/{first}/" in DOC or f"`{first}/`" in DOC, route


def test_retention_is_documented_in_calendar_years_with_pruning_not_implemented() -> None:
    assert "SANDBOX_AUDIT_RETENTION_YEARS" in DOC and "2,555 days" in DOC
    assert "Pruning is not implemented" in DOC
