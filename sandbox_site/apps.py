"""The site: URL map, middleware, health and metrics endpoints, the serve command."""

from django.apps import AppConfig

from sandbox_site import checks, metrics

__all__ = ["SiteConfig", "checks"]  # checks: registered with Django's at import


class SiteConfig(AppConfig):
    name = "sandbox_site"
    verbose_name = "Site"

    def ready(self) -> None:
        metrics.register()
