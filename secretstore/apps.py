"""The secrets store: values owned by a user or a group, encrypted at rest, never in the log."""

from django.apps import AppConfig

# The store's event types join the catalogue while the apps load (before it is first read).
from secretstore import catalogue  # noqa: F401


class SecretStoreConfig(AppConfig):
    name = "secretstore"
    verbose_name = "Secrets"
    default_auto_field = "django.db.models.BigAutoField"
