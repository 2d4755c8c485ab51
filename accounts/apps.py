"""Users, roles, API tokens and login security."""

from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Accounts"

    def ready(self) -> None:
        # Here, not at the top: the receivers import the models, which load after the apps.
        from accounts import signals  # noqa: F401
