"""Users, roles, API tokens and login security."""

from django.apps import AppConfig
from django.db.models.signals import post_migrate


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Accounts"

    def ready(self) -> None:
        from accounts import roles, signals  # noqa: F401  (auth signal receivers)

        post_migrate.connect(roles.sync_roles_after_migrate)
