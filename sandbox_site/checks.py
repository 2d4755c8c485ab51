"""System checks of the site's settings (``manage.py check``, and at every start of ``serve``)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks


@checks.register(checks.Tags.compatibility)
def preview_domain(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Preview URLs are off on a dashboard with a public name until a domain is set for them."""
    if settings.SANDBOX_PREVIEW_DOMAIN or not settings.SANDBOX_PREVIEW_DOMAIN_DEFAULTED:
        return []
    return [
        checks.Warning(
            "Preview URLs are off: the dashboard is served under a name other than a local one "
            "and SANDBOX_PREVIEW_DOMAIN is not set.",
            hint="Set SANDBOX_PREVIEW_DOMAIN to a domain of its own (a wildcard DNS name that "
            "points at this server, e.g. preview.example.net), or to an empty value to keep "
            "previews off without this warning (docs/networking.md).",
            id="sandbox.W040",
        )
    ]
