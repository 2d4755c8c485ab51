"""Dashboard forms of the auditor area: trail filters and export requests.

Export forms only collect input; ``audit.exports.clean_request`` is the one validator, shared
with the API, and its field errors are put back on the form.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django import forms
from django.core.exceptions import ValidationError

from audit import catalogue, compliance, exports
from audit.commands import has_control


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _no_control(value: str) -> None:
    # The filters are recorded in the read's event (audit.trail_read): no control characters.
    if has_control(value):
        raise ValidationError("control characters are not allowed")


class TrailFilterForm(forms.Form):
    """Filters of the audit trail; every field optional, all applied together."""

    actor = forms.CharField(required=False, max_length=150, label="Actor", validators=[_no_control])
    type = forms.ChoiceField(required=False, label="Event type")
    aggregate_type = forms.ChoiceField(required=False, label="Subject type")
    aggregate_id = forms.CharField(
        required=False, max_length=64, label="Subject id (VM, user...)", validators=[_no_control]
    )
    since = forms.DateTimeField(required=False, label="From (UTC)")
    until = forms.DateTimeField(required=False, label="To (UTC, excluded)")
    q = forms.CharField(
        required=False, max_length=200, label="Text in data", validators=[_no_control]
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        types = catalogue.all_types()
        self.fields["type"].choices = [("", "any")] + [(t.name, t.name) for t in types]
        aggregates = sorted({t.aggregate_type for t in types})
        self.fields["aggregate_type"].choices = [("", "any")] + [(a, a) for a in aggregates]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        data["since"] = _aware(data.get("since"))
        data["until"] = _aware(data.get("until"))
        if data["since"] and data["until"] and data["since"] >= data["until"]:
            self.add_error("until", "must be after From")
        return data


class ReportForm(forms.Form):
    framework = forms.ChoiceField(choices=[(k, f.name) for k, f in compliance.FRAMEWORKS.items()])
    format = forms.ChoiceField(choices=[(f, f.upper()) for f in exports.REPORT_FORMATS])
    since = forms.CharField(label="From (ISO date or date-time, UTC)")
    until = forms.CharField(label="To (excluded)")


class BundleForm(forms.Form):
    since = forms.CharField(label="From (ISO date or date-time, UTC)")
    until = forms.CharField(label="To (excluded)")


class ArchiveForm(forms.Form):
    before = forms.CharField(label="Every event recorded before (ISO date)")


EXPORT_FORMS: dict[str, type[forms.Form]] = {
    "report": ReportForm,
    "bundle": BundleForm,
    "archive": ArchiveForm,
}
