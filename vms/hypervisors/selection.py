"""Which driver runs this host's guests: ``SANDBOX_HYPERVISOR=auto|cloud-hypervisor|qemu``.

Above the drivers (it knows each of them) and the KVM probe (``probe.kvm_usable``).
"""

from __future__ import annotations

import os
import shutil

from .base import Hypervisor, HypervisorError
from .cloud_hypervisor import CloudHypervisor
from .jail import JailConfig
from .probe import kvm_usable
from .qemu import QemuHypervisor

__all__ = ["select_hypervisor"]


def select_hypervisor(
    setting: str | None = None, *, jail_config: JailConfig | None = None
) -> Hypervisor:
    """The driver for ``setting`` (default: ``$SANDBOX_HYPERVISOR`` or ``auto``), jailing its
    VMMs as ``jail_config`` says (default: from ``$SANDBOX_JAIL*``).

    ``auto``: Cloud Hypervisor when its binary is on PATH and KVM runs guests, else QEMU.
    """
    if setting is None:
        setting = os.environ.get("SANDBOX_HYPERVISOR", "auto")
    choice = setting.strip().lower()
    if choice == "auto":
        if shutil.which("cloud-hypervisor") and kvm_usable()[0]:
            choice = "cloud-hypervisor"
        else:
            choice = "qemu"
    if choice == "qemu":
        return QemuHypervisor(jail_config=jail_config)
    if choice in ("cloud-hypervisor", "cloud_hypervisor", "ch"):
        return CloudHypervisor(jail_config=jail_config)
    raise HypervisorError(
        f"unknown SANDBOX_HYPERVISOR {setting!r}: use auto, cloud-hypervisor or qemu"
    )
