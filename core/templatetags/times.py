"""``{{ value|when }}``: a moment as ``<time>``, in UTC with the zone named, for every page.

The server always writes UTC ("2026-11-30 13:24:02 UTC", the zone of the event log, the logs and
the exports); the page's script (``static/js/times.js``) rewrites each ``<time data-when>`` in the
browser's own zone when the user chose local times with the header's toggle, and puts the other
reading in its title. One filter, so every time label on every page reads the same way.
"""

from __future__ import annotations

import datetime as dt

from django import template
from django.utils.html import format_html
from django.utils.safestring import SafeString

register = template.Library()

# Precision: "d" a date, "m" to the minute, "s" to the second, "ms" with microseconds, "t" the
# time of day alone (a list whose dates are shown elsewhere).
FORMATS = {
    "d": "%Y-%m-%d",
    "m": "%Y-%m-%d %H:%M",
    "s": "%Y-%m-%d %H:%M:%S",
    "ms": "%Y-%m-%d %H:%M:%S.%f",
    "t": "%H:%M:%S",
}


@register.filter
def when(value: dt.datetime | dt.date | str | None, precision: str = "s") -> SafeString | str:
    """``value`` as ``<time datetime=ISO data-when=precision>text UTC</time>``; "" for None (so
    ``|when|default:"never"`` reads "never")."""
    if not value:
        return ""
    if isinstance(value, str):  # an ISO string (a representation's or a report's field)
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return value
    fmt = FORMATS.get(precision)
    if fmt is None:
        raise template.TemplateSyntaxError(f"when: precision one of {', '.join(FORMATS)}")
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:  # naive: the project stores aware UTC; read it as UTC
            value = value.replace(tzinfo=dt.UTC)
        value = value.astimezone(dt.UTC)
        text = f"{value.strftime(fmt)} UTC"
    else:  # a date: no zone
        text = value.strftime(FORMATS["d"])
        precision = "d"
    return format_html(
        '<time datetime="{}" data-when="{}">{}</time>', value.isoformat(), precision, text
    )
