"""Sections that apps above audit add to the auditor area's navigation.

The auditor area (``audit.urls_dashboard``) lists its own pages; a page an upper app serves to
auditors (the VM domain's console sessions) is linked from the same navigation through a
registration made while the apps load (``AppConfig.ready``), so audit names no upper app's URL.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Section", "register", "registered"]


@dataclass(frozen=True)
class Section:
    key: str  # the ``section`` a page passes to its template, to mark its link active
    label: str
    url_name: str  # reversed without arguments


_SECTIONS: dict[str, Section] = {}


def register(section: Section) -> None:
    """Add a section (the same again does nothing; another for a known key: RuntimeError)."""
    known = _SECTIONS.get(section.key)
    if known is not None and known != section:
        raise RuntimeError(f"auditor section {section.key} is already registered: {known}")
    _SECTIONS[section.key] = section


def registered() -> tuple[Section, ...]:
    return tuple(_SECTIONS.values())
