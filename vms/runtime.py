"""Where a VM lives on its host, and the VMSpec the drivers get for it."""

from __future__ import annotations

import functools
import hashlib
import socket
from pathlib import Path

from django.conf import settings

from vms import images
from vms.hypervisors.base import DiskSpec, Hypervisor, NetSpec, RuntimeDir, VMSpec
from vms.hypervisors.jail import JailConfig
from vms.hypervisors.selection import select_hypervisor
from vms.models import VirtualMachine


def host_name() -> str:
    return socket.gethostname()


def runtime_dir(vm_id: object) -> RuntimeDir:
    # Short names: unix socket paths are limited to 107 bytes.
    return RuntimeDir(Path(settings.SANDBOX_RUNTIME_DIR) / str(vm_id).replace("-", "")[:12])


def vm_data_dir(vm_id: object) -> Path:
    return Path(settings.SANDBOX_VM_DATA_DIR) / str(vm_id)


def suspend_dir(vm_id: object) -> Path:
    """Where a VM suspended to disk keeps its saved state (vms.idle): under its data dir, so
    it outlives a host restart and goes with the VM's destroy."""
    return vm_data_dir(vm_id) / "suspended"


def snapshot_dir(snapshot_id: object) -> Path:
    return Path(settings.SANDBOX_SNAPSHOT_DIR) / str(snapshot_id)


def jail_config() -> JailConfig:
    """How this host jails its VMMs (``SANDBOX_JAIL*`` settings)."""
    return JailConfig(
        mode=settings.SANDBOX_JAIL,
        uid_base=settings.SANDBOX_JAIL_UID_BASE,
        uid_count=settings.SANDBOX_JAIL_UID_COUNT,
        state_dir=Path(settings.SANDBOX_JAIL_DIR),
        cgroup_parent=settings.SANDBOX_JAIL_CGROUP,
        memory_margin_mib=settings.SANDBOX_JAIL_MEMORY_MARGIN_MIB,
    )


@functools.cache
def hypervisor() -> Hypervisor:
    return select_hypervisor(settings.SANDBOX_HYPERVISOR, jail_config=jail_config())


def build_spec(
    vm: VirtualMachine, image_id: str | None = None, nets: tuple[NetSpec, ...] = ()
) -> VMSpec:
    """The driver-level description of ``vm``: shared read-only root, its own data disk, and
    ``nets``, its NICs as plugged on this host (``vms.vmnet.plug``; none for a VM without).

    On the current guest image, or with ``image_id`` on that one (a snapshot's: ImageNotKept
    when this host no longer has it). ``spec.extra["image_id"]`` says which it is.
    """
    if vm.image == "windows":
        raise images.ImageNotBuilt(
            "no Windows image is installed on this host (see docs/images.md for the UEFI path)"
        )
    data_disk = vm_data_dir(vm.pk) / "data.img"
    extra = {"hostname": vm.hostname}
    if vm.boot == "uefi":
        uefi = images.uefi_image(image_id)
        extra["image_id"] = uefi.image_id
        return VMSpec(
            vm_id=vm.pk.hex[:12],
            boot="uefi",
            vcpus=vm.vcpus,
            memory_mib=vm.memory_mib,
            firmware_code=uefi.firmware_code,
            disks=(
                DiskSpec(path=uefi.disk, readonly=True, id="esp"),
                DiskSpec(path=uefi.rootfs, readonly=True, id="root"),
                DiskSpec(path=data_disk, id="data"),
            ),
            nets=nets,
            extra=extra,
        )
    linux = images.linux_image(image_id)
    extra["image_id"] = linux.image_id
    return VMSpec(
        vm_id=vm.pk.hex[:12],
        boot="linux",
        vcpus=vm.vcpus,
        memory_mib=vm.memory_mib,
        kernel=linux.kernel,
        initramfs=linux.initramfs,
        cmdline=linux.cmdline,  # identity comes through the agent, so snapshots stay portable
        disks=(
            DiskSpec(path=linux.rootfs, readonly=True, id="root"),
            DiskSpec(path=data_disk, id="data"),
        ),
        nets=nets,
        extra=extra,
    )


# The image a VMM was launched with, written into its runtime directory before the launch: what
# is really running, readable by whoever finds the VMM later (the reconciler completing a start
# whose worker died, a snapshot of it). It goes with the runtime directory when the VMM does.
LAUNCHED_IMAGE = "image_id"
_IMAGE_ID_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyz")


def record_launched_image(rt: RuntimeDir, spec: VMSpec) -> str:
    """Write the image of ``spec`` into ``rt`` (before its VMM is launched); return it."""
    image_id = str(spec.extra.get("image_id", ""))
    if not image_id or not set(image_id) <= _IMAGE_ID_CHARS:
        raise images.ImageNotBuilt(f"the spec names no usable image id ({image_id!r})")
    path = rt.root / LAUNCHED_IMAGE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(image_id)
    tmp.replace(path)
    return image_id


def launched_image(rt: RuntimeDir) -> str | None:
    """The image the VMM of ``rt`` was launched with; None when that is not known."""
    try:
        image_id = (rt.root / LAUNCHED_IMAGE).read_text().strip()
    except OSError:
        return None
    return image_id if image_id and set(image_id) <= _IMAGE_ID_CHARS else None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
