"""Where the built guest images are, and the per-VM pieces made from them (no Django imports).

``images/build.py`` builds the Linux guest into a cache directory named after a hash of its
recipe; this module computes the same name (by loading build.py), checks that the image is there
and hands out paths plus the base kernel command line. ``SANDBOX_IMAGE_DIR`` points at a built
image directory directly (e.g. on a hypervisor host that has no checkout of ``images/``).

Layout of an image directory::

    vmlinuz  initramfs.cpio  rootfs.ext4  manifest.json     # direct kernel boot (microvm)
    uefi/esp.img  uefi/BOOTX64.EFI  uefi/manifest.json      # UEFI: ESP disk + same rootfs.ext4

The root filesystem is shared read-only by every VM; each VM gets its own writable data disk
(``make_data_disk``), which the guest mounts at /data.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal, overload

__all__ = [
    "BUILD_SCRIPT",
    "DATA_DISK_LABEL",
    "ImageNotBuilt",
    "LinuxImage",
    "UefiImage",
    "base_cmdline",
    "ensure_built",
    "host_tsc_khz",
    "image_dir",
    "linux_image",
    "make_data_disk",
    "uefi_image",
]

BUILD_SCRIPT = Path(__file__).resolve().parent.parent / "images" / "build.py"
DATA_DISK_LABEL = "sandbox-data"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
BUILD_TIMEOUT_S = 1800.0


class ImageNotBuilt(RuntimeError):
    """The guest image for the current recipe is not in the cache (run ``make images``)."""


@dataclass(frozen=True)
class LinuxImage:
    """Direct kernel boot: the rootfs is attached read-only as the first virtio disk."""

    directory: Path
    kernel: Path
    initramfs: Path
    rootfs: Path
    cmdline: str  # base command line; append per-VM sandbox.* parameters
    kernel_release: str


@dataclass(frozen=True)
class UefiImage:
    """UEFI boot: ``disk`` (GPT + ESP with the unified kernel image) first, then ``rootfs``.

    The kernel command line is baked into the unified kernel image; per-VM identity is given
    through the agent's ``configure`` request instead of ``sandbox.*`` parameters.
    """

    directory: Path
    disk: Path
    rootfs: Path
    firmware_code: Path
    firmware_vars: Path  # template: copy it per VM, OVMF writes to its variable store


@functools.cache
def _build_module() -> ModuleType:
    if not BUILD_SCRIPT.is_file():
        raise ImageNotBuilt(
            f"{BUILD_SCRIPT} not found: set SANDBOX_IMAGE_DIR to a built image directory"
        )
    spec = importlib.util.spec_from_file_location("_sandbox_image_build", BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _recipe_dir() -> Path:
    build = _build_module()
    try:
        return Path(build.cache_root()) / build.recipe_hash()
    except SystemExit as exc:  # build.py reports apt problems as SystemExit
        raise ImageNotBuilt(str(exc)) from exc


def image_dir() -> Path:
    """The image directory for the current recipe (it may not be built yet)."""
    env = os.environ.get("SANDBOX_IMAGE_DIR")
    return Path(env) if env else _recipe_dir()


def _manifest(directory: Path) -> dict[str, object]:
    try:
        return json.loads((directory / "manifest.json").read_text())
    except FileNotFoundError:
        raise ImageNotBuilt(
            f"no guest image at {directory}: build it with `make images` "
            f"(python {BUILD_SCRIPT.relative_to(BUILD_SCRIPT.parent.parent)})"
        ) from None


def host_tsc_khz() -> int:
    """The host TSC frequency in kHz (``SANDBOX_TSC_KHZ`` overrides).

    Guests under TCG on microvm have no HPET or PM timer to calibrate the TSC against and often
    hang at boot without ``tsc_early_khz`` (see shared/guest-notes.md). The kernel's own
    "tsc: Detected" value is what /proc/cpuinfo's "cpu MHz" shows on these hosts.
    """
    env = os.environ.get("SANDBOX_TSC_KHZ")
    if env:
        return int(env)
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key.strip() == "cpu MHz":
                return round(float(value) * 1000)
    raise RuntimeError("no 'cpu MHz' in /proc/cpuinfo: set SANDBOX_TSC_KHZ")


def base_cmdline() -> str:
    """The kernel command line every direct-boot VM starts from.

    ``quiet``: every console line costs an emulated UART's worth of exits under TCG.
    ``panic=-1``: a guest that panics resets at once instead of hanging where nobody looks.
    """
    return f"console=ttyS0 quiet panic=-1 tsc_early_khz={host_tsc_khz()}"


def linux_image() -> LinuxImage:
    directory = image_dir()
    manifest = _manifest(directory)
    return LinuxImage(
        directory=directory,
        kernel=directory / "vmlinuz",
        initramfs=directory / "initramfs.cpio",
        rootfs=directory / "rootfs.ext4",
        cmdline=base_cmdline(),
        kernel_release=str(manifest.get("kernel_release", "")),
    )


def uefi_image() -> UefiImage:
    directory = image_dir()
    _manifest(directory)
    _manifest(directory / "uefi")
    return UefiImage(
        directory=directory,
        disk=directory / "uefi" / "esp.img",
        rootfs=directory / "rootfs.ext4",
        firmware_code=OVMF_CODE,
        firmware_vars=OVMF_VARS,
    )


@overload
def ensure_built(uefi: Literal[False] = False) -> LinuxImage: ...
@overload
def ensure_built(uefi: Literal[True]) -> UefiImage: ...
def ensure_built(uefi: bool = False) -> LinuxImage | UefiImage:
    """Build the image if this recipe has not been built yet (root; about a minute), then
    return its paths. A no-op when it exists."""
    try:
        return uefi_image() if uefi else linux_image()
    except ImageNotBuilt:
        if os.environ.get("SANDBOX_IMAGE_DIR"):
            raise
    argv = [sys.executable, str(BUILD_SCRIPT), *(["--uefi"] if uefi else [])]
    try:
        subprocess.run(argv, check=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        raise ImageNotBuilt(f"image build failed ({' '.join(argv)}: {exc.returncode})") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageNotBuilt(f"image build took more than {BUILD_TIMEOUT_S:.0f}s") from exc
    return uefi_image() if uefi else linux_image()


def make_data_disk(path: str | Path, size_mib: int, *, label: str = DATA_DISK_LABEL) -> Path:
    """Create a VM's writable data disk: a sparse raw file with an empty ext4 on it.

    Sparse plus lazy inode-table init keeps it fast (tens of ms) and small on the host whatever
    its size; the guest mounts it with ``noinit_itable`` so it never zeroes the tables either.
    The guest finds it by label, so its position among the disks does not matter.
    """
    if size_mib < 8:
        raise ValueError("a data disk needs at least 8 MiB")
    path = Path(path)
    with open(path, "xb") as fh:
        fh.truncate(size_mib << 20)
    try:
        subprocess.run(
            [
                "mkfs.ext4", "-q", "-F", "-L", label, "-m", "0",
                "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                str(path),
            ],
            check=True, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except subprocess.CalledProcessError as exc:
        path.unlink(missing_ok=True)
        raise RuntimeError(f"mkfs.ext4 {path} failed: {exc.stderr.strip()}") from exc
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path
