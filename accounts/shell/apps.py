"""An app of management commands only: no models, no admin."""

from django.apps import AppConfig


class AccountsShellConfig(AppConfig):
    name = "accounts.shell"
    label = "accounts_shell"
    verbose_name = "Accounts (shell commands)"
