"""Where the built guest images are, and the per-VM pieces made from them (no Django imports).

The contract with ``images/build.py`` is the image cache and nothing else: build.py writes each
image into ``<cache>/<recipe-hash>/`` with a ``manifest.json`` (recipe hash, ``image_id``, every
file's SHA-256) and points the cache's ``current`` symlink at the image new VMs get. This module
reads the pointer and the manifests; it never runs the build or asks apt anything at run time.
``SANDBOX_IMAGE_DIR`` names the current image directory directly (e.g. on a hypervisor host that
has no checkout of ``images/``); ``SANDBOX_IMAGE_CACHE`` moves the cache.

An image is known by its ``image_id`` (a digest of its boot files): ``vm.started`` and
``snapshot.created`` record it, and a snapshot is restored on the image it was taken on, found
among the images kept in the cache (``linux_image(image_id)``), or not at all.

Layout of an image directory::

    vmlinuz  initramfs.cpio  rootfs.ext4  manifest.json     # direct kernel boot (microvm)
    uefi/esp.img  uefi/BOOTX64.EFI  uefi/manifest.json      # UEFI: ESP disk + same rootfs.ext4

The root filesystem is shared read-only by every VM; each VM gets its own writable data disk
(``make_data_disk``), which the guest mounts at /data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

__all__ = [
    "BUILD_SCRIPT",
    "CURRENT",
    "DATA_DISK_LABEL",
    "ImageNotBuilt",
    "ImageNotKept",
    "LinuxImage",
    "UefiImage",
    "base_cmdline",
    "cache_root",
    "current_image_id",
    "ensure_built",
    "host_tsc_khz",
    "image_dir",
    "linux_image",
    "make_data_disk",
    "snapshot_image",
    "uefi_image",
]

BUILD_SCRIPT = Path(__file__).resolve().parent.parent / "images" / "build.py"
DATA_DISK_LABEL = "sandbox-data"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
BUILD_TIMEOUT_S = 1800.0
MANIFEST = "manifest.json"
CURRENT = "current"  # the cache's pointer to the image new VMs get (written by build.py)


class ImageNotBuilt(RuntimeError):
    """No current guest image on this host, or an unusable one (run ``make images``)."""


class ImageNotKept(ImageNotBuilt):
    """The image a snapshot was taken on is no longer on this host."""

    def __init__(self, image_id: str, current: str | None) -> None:
        self.image_id, self.current = image_id, current
        now = f"the current image is {current}" if current else "there is no current image"
        super().__init__(
            f"image {image_id} is not kept on this host any more ({now}); a snapshot is "
            "restored only on the image it was taken on"
        )


@dataclass(frozen=True)
class LinuxImage:
    """Direct kernel boot: the rootfs is attached read-only as the first virtio disk."""

    directory: Path
    kernel: Path
    initramfs: Path
    rootfs: Path
    cmdline: str  # base command line; append per-VM sandbox.* parameters
    kernel_release: str
    image_id: str


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
    image_id: str


_BUILD_HINT = "build it with `make images` (python images/build.py --uefi)"


def cache_root() -> Path:
    """Where build.py keeps its images (``SANDBOX_IMAGE_CACHE``, as build.py reads it)."""
    env = os.environ.get("SANDBOX_IMAGE_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "microvm-sandbox" / "images"


def image_dir() -> Path:
    """The current image's directory: ``SANDBOX_IMAGE_DIR``, else where the cache's ``current``
    pointer leads (ImageNotBuilt when there is none)."""
    env = os.environ.get("SANDBOX_IMAGE_DIR")
    if env:
        return Path(env)
    pointer = cache_root() / CURRENT
    if not pointer.is_symlink():
        raise ImageNotBuilt(f"no current guest image ({pointer} is missing): {_BUILD_HINT}")
    return pointer.resolve()


def _manifest(directory: Path) -> dict[str, object]:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise ImageNotBuilt(f"no guest image at {directory}: {_BUILD_HINT}") from None
    except ValueError as exc:
        raise ImageNotBuilt(f"unreadable {directory / MANIFEST} ({exc}): {_BUILD_HINT}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("image_id"), str):
        # Written before images had ids: build.py adds the id when it next runs (no rebuild).
        raise ImageNotBuilt(f"the image at {directory} has no image_id: {_BUILD_HINT}")
    return manifest


def current_image_id() -> str | None:
    """The id of the image new VMs get, or None when there is none."""
    try:
        return str(_manifest(image_dir())["image_id"])
    except ImageNotBuilt:
        return None


def _kept_image_dir(image_id: str) -> Path:
    """The directory of the image ``image_id``: the current one, or another kept in the cache."""
    candidates = []
    try:
        candidates.append(image_dir())
    except ImageNotBuilt:
        pass
    root = cache_root()
    if root.is_dir():
        candidates += sorted(p.parent for p in root.glob(f"*/{MANIFEST}"))
    for directory in candidates:
        try:
            if _manifest(directory)["image_id"] == image_id:
                return directory
        except ImageNotBuilt:
            continue
    raise ImageNotKept(image_id, current_image_id())


def snapshot_image(image_id: str) -> str:
    """The image a snapshot taken on ``image_id`` is restored on: that one, if this host keeps
    it (ImageNotKept otherwise); ImageNotBuilt when the snapshot recorded no image (its saved
    RAM would meet a root filesystem nobody can vouch for)."""
    if not image_id:
        raise ImageNotBuilt(
            "the snapshot does not record the image it was taken on, so it cannot be restored "
            "safely on any image"
        )
    _kept_image_dir(image_id)
    return image_id


def _resolve(image_id: str | None) -> tuple[Path, dict[str, object]]:
    directory = image_dir() if image_id is None else _kept_image_dir(image_id)
    return directory, _manifest(directory)


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
    ``reboot=t``: the guest's own reboot is a triple fault, which QEMU turns into a machine
    reset; the kernel's default tries firmware paths first, and in a guest restored from a saved
    state one of them sometimes jumped into nothing and spun there (a reboot then needed the
    VMM's hard reset after the grace).
    """
    return f"console=ttyS0 quiet panic=-1 reboot=t tsc_early_khz={host_tsc_khz()}"


def linux_image(image_id: str | None = None) -> LinuxImage:
    """The current image, or with ``image_id`` that image if this host still keeps it
    (ImageNotKept otherwise)."""
    directory, manifest = _resolve(image_id)
    return LinuxImage(
        directory=directory,
        kernel=directory / "vmlinuz",
        initramfs=directory / "initramfs.cpio",
        rootfs=directory / "rootfs.ext4",
        cmdline=base_cmdline(),
        kernel_release=str(manifest.get("kernel_release", "")),
        image_id=str(manifest["image_id"]),
    )


def uefi_image(image_id: str | None = None) -> UefiImage:
    """As ``linux_image``, for UEFI boot (the image's ``uefi/`` part must be built too)."""
    directory, manifest = _resolve(image_id)
    if not (directory / "uefi" / MANIFEST).is_file():
        raise ImageNotBuilt(f"the image at {directory} has no UEFI part: {_BUILD_HINT}")
    return UefiImage(
        directory=directory,
        disk=directory / "uefi" / "esp.img",
        rootfs=directory / "rootfs.ext4",
        firmware_code=OVMF_CODE,
        firmware_vars=OVMF_VARS,
        image_id=str(manifest["image_id"]),
    )


_ensured: dict[bool, str] = {}  # uefi -> the image id ensure_built made current in this process


@overload
def ensure_built(uefi: Literal[False] = False) -> LinuxImage: ...
@overload
def ensure_built(uefi: Literal[True]) -> UefiImage: ...
def ensure_built(uefi: bool = False) -> LinuxImage | UefiImage:
    """For development, tests and benches (never the runtime): run this checkout's
    ``images/build.py``, which builds the image if its recipe has not been built yet (root;
    about a minute) and makes it current, then return that image (by its id: the pointer may
    move on meanwhile if another checkout with another recipe shares the cache). With
    ``SANDBOX_IMAGE_DIR`` set, that directory is the image and nothing is built."""
    if os.environ.get("SANDBOX_IMAGE_DIR"):
        return uefi_image() if uefi else linux_image()
    if uefi in _ensured:  # once per process: later calls only check it is still there
        return uefi_image(_ensured[uefi]) if uefi else linux_image(_ensured[uefi])
    if not BUILD_SCRIPT.is_file():
        raise ImageNotBuilt(f"{BUILD_SCRIPT} not found: set SANDBOX_IMAGE_DIR to a built image")
    argv = [sys.executable, str(BUILD_SCRIPT), *(["--uefi"] if uefi else [])]
    try:
        done = subprocess.run(
            argv, check=True, timeout=BUILD_TIMEOUT_S, stdout=subprocess.PIPE, text=True
        )
    except subprocess.CalledProcessError as exc:
        raise ImageNotBuilt(f"image build failed ({' '.join(argv)}: {exc.returncode})") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageNotBuilt(f"image build took more than {BUILD_TIMEOUT_S:.0f}s") from exc
    sys.stdout.write(done.stdout)
    built = str(_manifest(Path(done.stdout.strip().splitlines()[-1]))["image_id"])
    _ensured[uefi] = built
    return uefi_image(built) if uefi else linux_image(built)


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
