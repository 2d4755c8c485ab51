"""vms.images: where the built guest image is, the kernel command line, per-VM data disks."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from vms import images


def test_base_cmdline_carries_the_host_tsc_frequency(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOX_TSC_KHZ", raising=False)
    khz = images.host_tsc_khz()
    assert 100_000 < khz < 10_000_000
    cmdline = images.base_cmdline()
    assert f"tsc_early_khz={khz}" in cmdline.split()
    assert "console=ttyS0" in cmdline.split()


def test_tsc_frequency_can_be_overridden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_TSC_KHZ", "2000000")
    assert "tsc_early_khz=2000000" in images.base_cmdline()


def test_a_missing_image_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SANDBOX_IMAGE_DIR", str(tmp_path / "nothing-here"))
    with pytest.raises(images.ImageNotBuilt, match="make images"):
        images.linux_image()
    with pytest.raises(images.ImageNotBuilt):
        images.uefi_image()


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")
def test_data_disk_is_a_sparse_labelled_ext4(tmp_path: Path) -> None:
    disk = images.make_data_disk(tmp_path / "data.img", 1024)
    st = disk.stat()
    assert st.st_size == 1024 << 20
    assert st.st_blocks * 512 < 64 << 20  # sparse: mkfs wrote only metadata
    out = subprocess.run(
        ["dumpe2fs", "-h", str(disk)], capture_output=True, text=True, check=True
    ).stdout
    assert "Filesystem volume name:   sandbox-data" in out


def test_data_disk_never_overwrites_an_existing_file(tmp_path: Path) -> None:
    existing = tmp_path / "data.img"
    existing.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        images.make_data_disk(existing, 64)
    assert existing.read_bytes() == b"precious"


@pytest.mark.guest
def test_the_build_produced_an_image_matching_its_manifest() -> None:
    try:
        image = images.linux_image()
    except images.ImageNotBuilt as exc:
        pytest.skip(str(exc))
    manifest = json.loads((image.directory / "manifest.json").read_text())
    assert set(manifest["files"]) == {"vmlinuz", "initramfs.cpio", "rootfs.ext4"}
    for name, entry in manifest["files"].items():
        path = image.directory / name
        assert path.stat().st_size == entry["size"]
    # Hashing the 190 MB rootfs takes a while; the kernel is representative enough.
    digest = hashlib.sha256(image.kernel.read_bytes()).hexdigest()
    assert digest == manifest["files"]["vmlinuz"]["sha256"]
    assert manifest["kernel_release"] in manifest["packages"]["kernel_package"]
    assert "tsc_early_khz=" in image.cmdline
