"""An app of management commands only: no models, no admin."""

from django.apps import AppConfig


class VmsShellConfig(AppConfig):
    name = "vms.shell"
    label = "vms_shell"
    verbose_name = "VMs (shell commands)"
