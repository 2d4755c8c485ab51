"""The VM domain: commands, projections, hypervisor drivers, guest agent client, API."""

from django.apps import AppConfig


class VmsConfig(AppConfig):
    name = "vms"
    verbose_name = "Virtual machines"
