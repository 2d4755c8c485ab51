"""The image contract: ``images/build.py`` writes a manifest (recipe hash, image id, file hashes)
and a ``current`` pointer into the image cache; ``vms/images.py`` reads those and nothing else.

The cache here is fabricated with build.py's own writers (no debootstrap), so these tests check
the two sides against each other without building anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from vms import images

BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "images" / "build.py"
BOOT_FILES = ("vmlinuz", "initramfs.cpio", "rootfs.ext4")


def load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_test_image_build", BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = load_build()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "image-cache"
    root.mkdir()
    monkeypatch.setenv("SANDBOX_IMAGE_CACHE", str(root))
    monkeypatch.delenv("SANDBOX_IMAGE_DIR", raising=False)
    return root


def fabricate(root: Path, recipe: str, content: bytes = b"", *, uefi: bool = False) -> Path:
    """An image directory as build.py leaves it, with tiny stand-ins for the boot files."""
    directory = root / recipe
    directory.mkdir()
    files = {}
    for name in BOOT_FILES:
        (directory / name).write_bytes(name.encode() + content)
        files[name] = build.file_entry(directory / name)
    manifest = {
        "recipe_hash": recipe,
        "image_id": build.image_id(files),
        "kernel_release": "6.1.0-test-cloud-amd64",
        "files": files,
    }
    build.write_json(directory / build.MANIFEST, manifest)
    if uefi:
        (directory / "uefi").mkdir()
        (directory / "uefi" / "esp.img").write_bytes(b"esp")
        build.write_json(
            directory / "uefi" / build.MANIFEST, {"image_id": manifest["image_id"], "files": {}}
        )
    return directory


def image_id_of(directory: Path) -> str:
    return json.loads((directory / "manifest.json").read_text())["image_id"]


def test_the_image_is_found_through_the_current_pointer(cache: Path) -> None:
    first = fabricate(cache, "aaaa000000000001")
    second = fabricate(cache, "bbbb000000000002", b"v2")
    build.point_current(cache, first)
    assert images.linux_image().directory == first
    assert images.linux_image().image_id == image_id_of(first)
    build.point_current(cache, second)
    image = images.linux_image()
    assert image.directory == second
    assert image.image_id == image_id_of(second) != image_id_of(first)
    assert image.kernel == second / "vmlinuz"
    assert image.rootfs == second / "rootfs.ext4"
    assert (cache / "current").readlink() == Path("bbbb000000000002")  # relative: the cache moves


def test_reading_the_image_runs_nothing_and_never_loads_the_recipe(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No apt, no build.py at run time: a host without a checkout or apt lists finds its image."""
    build.point_current(cache, fabricate(cache, "cccc000000000003"))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"ran {args!r} at run time")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(images, "BUILD_SCRIPT", cache / "no-checkout" / "build.py")
    monkeypatch.setattr(importlib.util, "spec_from_file_location", refuse)
    assert images.linux_image().image_id == image_id_of(cache / "cccc000000000003")
    assert images.current_image_id() == image_id_of(cache / "cccc000000000003")


def test_without_a_pointer_there_is_no_current_image(cache: Path) -> None:
    fabricate(cache, "dddd000000000004")  # built, but never made current
    with pytest.raises(images.ImageNotBuilt, match="make images"):
        images.linux_image()
    assert images.current_image_id() is None


def test_a_manifest_from_before_image_ids_gets_its_id_from_the_hashes_it_lists(
    cache: Path,
) -> None:
    directory = fabricate(cache, "eeee000000000005")
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["image_id"]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    build.point_current(cache, directory)
    with pytest.raises(images.ImageNotBuilt, match="no image_id"):
        images.linux_image()
    # What build.py does when it finds the recipe up to date: no rebuild, the id is added.
    ident = build.ensure_image_id(directory)
    expected = {n: hashlib.sha256(n.encode()).hexdigest() for n in BOOT_FILES}
    assert ident == hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:16]
    assert build.ensure_image_id(directory) == ident
    assert images.linux_image().image_id == ident


def test_the_image_id_follows_content_not_recipe(cache: Path) -> None:
    a = fabricate(cache, "ffff000000000006")
    b = fabricate(cache, "ffff000000000007")
    c = fabricate(cache, "ffff000000000008", b"other rootfs")
    assert image_id_of(a) == image_id_of(b) != image_id_of(c)


def test_a_kept_image_is_found_by_its_id_and_a_missing_one_is_refused(cache: Path) -> None:
    old = fabricate(cache, "1111000000000001", b"old")
    new = fabricate(cache, "2222000000000002", b"new")
    build.point_current(cache, new)
    assert images.linux_image(image_id_of(old)).directory == old
    assert images.linux_image(image_id_of(new)).directory == new
    with pytest.raises(images.ImageNotKept) as refused:
        images.linux_image("0123456789abcdef")
    assert refused.value.image_id == "0123456789abcdef"
    assert refused.value.current == image_id_of(new)
    assert "0123456789abcdef" in str(refused.value) and image_id_of(new) in str(refused.value)


def test_uefi_needs_the_uefi_part_of_the_image(cache: Path) -> None:
    plain = fabricate(cache, "3333000000000003")
    build.point_current(cache, plain)
    with pytest.raises(images.ImageNotBuilt, match="no UEFI part"):
        images.uefi_image()
    with_uefi = fabricate(cache, "4444000000000004", b"u", uefi=True)
    build.point_current(cache, with_uefi)
    uefi = images.uefi_image()
    assert uefi.disk == with_uefi / "uefi" / "esp.img"
    assert uefi.image_id == image_id_of(with_uefi)


def test_sandbox_image_dir_names_the_current_image_directly(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    direct = fabricate(elsewhere, "5555000000000005", b"direct")
    build.point_current(cache, fabricate(cache, "6666000000000006"))
    monkeypatch.setenv("SANDBOX_IMAGE_DIR", str(direct))
    assert images.linux_image().directory == direct
    # ensure_built builds nothing then: the directory is the image.
    monkeypatch.setattr(images, "BUILD_SCRIPT", tmp_path / "absent.py")
    assert images.ensure_built().image_id == image_id_of(direct)


def test_ensure_built_runs_the_build_once_and_returns_the_image_it_made_current(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The development helper runs this checkout's build.py (here a stand-in that records its
    runs and makes a fabricated image current) once per process, and keeps returning that image
    even when another checkout's build moves the pointer on."""
    mine = fabricate(cache, "7777000000000007", b"mine")
    theirs = fabricate(cache, "8888000000000008", b"theirs")
    runs = tmp_path / "runs"
    script = tmp_path / "build.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(BUILD_SCRIPT.parent)!r})\n"
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('b', {str(BUILD_SCRIPT)!r})\n"
        "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)\n"
        f"open({str(runs)!r}, 'a').write('run\\n')\n"
        f"b.point_current(b.cache_root(), b.Path({str(mine)!r}))\n"
        f"print('progress'); print({str(mine)!r})\n"
    )
    monkeypatch.setattr(images, "BUILD_SCRIPT", script)
    monkeypatch.setattr(images, "_ensured", {})
    assert images.ensure_built().directory == mine
    build.point_current(cache, theirs)
    again = images.ensure_built()
    assert again.directory == mine
    assert again.image_id == image_id_of(mine)
    assert runs.read_text() == "run\n"
