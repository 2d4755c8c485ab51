"""``{% auditor_sections as sections %}``: the sections upper apps added (``audit.sections``)."""

from __future__ import annotations

from django import template

from audit import sections

register = template.Library()


@register.simple_tag
def auditor_sections() -> tuple[sections.Section, ...]:
    return sections.registered()
