#!/usr/bin/env python3
"""Build the Linux sandbox guest image from Debian packages (stdlib only; run as root).

    python images/build.py [--uefi] [--force] [--print-dir]

What it makes, in ``${SANDBOX_IMAGE_CACHE:-~/.cache/microvm-sandbox/images}/<recipe-hash>/``:

- ``vmlinuz``: the kernel of Debian's ``linux-image-*-cloud-amd64`` (downloaded with
  ``apt-get download`` and unpacked with ``dpkg -x``, never installed on the host);
- ``initramfs.cpio``: a stage-1 initramfs (busybox-static, the virtio/vsock modules, ``init``)
  that mounts the root disk read-only and ``switch_root``s into it;
- ``rootfs.ext4``: a trimmed ``debootstrap --variant=minbase --include=python3`` bookworm tree
  with the guest agent and busybox init, packed by ``mkfs.ext4 -d`` without mounting anything;
- with ``--uefi``, ``uefi/``: a unified kernel image at ``\\EFI\\BOOT\\BOOTX64.EFI`` on the FAT
  ESP of a GPT disk (``uefi/esp.img``); the same ``rootfs.ext4`` is attached as a second disk.

The directory name hashes every recipe file and the Debian package versions resolved from the
host's apt lists, so a changed recipe builds a new directory and an unchanged one is a no-op that
prints the path. Each build happens in a temporary directory beside its destination and is
renamed into place, so a reader never sees half an image.

The contract with the control plane: each image directory's ``manifest.json`` carries the
recipe hash, every file's SHA-256 and the ``image_id`` (a digest of the boot files' hashes: what
a snapshot pins), and the cache's ``current`` symlink names the directory of the last image
built (or found up to date). ``vms/images.py`` reads those and nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

RECIPE_ROOT = Path(__file__).resolve().parent
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# python3 (not python3-minimal): the agent needs json, hashlib, subprocess and friends.
# procps: ps, pgrep, pkill, top and free are what people (and tests) reach for in a sandbox.
ROOTFS_INCLUDE = ("python3", "procps")
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")  # from busybox-static: the host's copy is what we ship
EFI_STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
# Every virtio driver is a module in the cloud kernel (ext4 is built in). Load order is derived
# from the modules' own "depends" at build time, so this list needs no particular order.
MODULES = (
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio-rng",
    "virtio_balloon",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    # The ACPI power button (PNP0C0C; QEMU's system_powerdown) as an input device, for acpid: a
    # stop is a clean power-off, not a kill after the grace period.
    "button",
    "evdev",
)
INITRAMFS_APPLETS = (
    "sh", "mount", "mkdir", "cat", "insmod", "findfs", "usleep", "switch_root", "poweroff",
)  # fmt: skip
# Trimmed from the rootfs: nobody reads documentation or translations inside a sandbox, and apt
# metadata is useless on a read-only root. Copyright files stay (licences travel with binaries).
TRIM_GLOBS = (
    "usr/share/man/*",
    "usr/share/info/*",
    "usr/share/locale/*",
    "usr/share/lintian/*",
    "usr/share/linda/*",
    "var/lib/apt/lists/*",
    "var/cache/apt/*",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "var/log/*",
)
ROOTFS_LABEL = "sandbox-root"
UKI_CMDLINE = "console=ttyS0,115200 quiet panic=-1"
ESP_SIZE_MIB = 40
ESP_TYPE_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
# The files whose bytes a guest sees (kernel, stage 1, root): their hashes make the image id. The
# UEFI disk is derived from the same kernel and initramfs, so it does not change the id.
IMAGE_ID_FILES = ("vmlinuz", "initramfs.cpio", "rootfs.ext4")
MANIFEST = "manifest.json"
CURRENT = "current"  # symlink in the cache: the image new VMs get

_started = time.monotonic()


def step(message: str) -> None:
    print(f"[{time.monotonic() - _started:6.1f}s] {message}", flush=True)


def run(*argv: str | Path, cwd: Path | None = None, capture: bool = False) -> str:
    """Run a command, failing loudly with its output when it fails."""
    proc = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(
            f"build.py: {' '.join(map(str, argv))} failed ({proc.returncode}):\n{proc.stderr}"
        )
    return proc.stdout if capture else ""


# --------------------------------------------------------------------------- recipe and cache


def cache_root() -> Path:
    env = os.environ.get("SANDBOX_IMAGE_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "microvm-sandbox" / "images"


def recipe_files() -> list[Path]:
    """Every file whose content shapes the image (build.py, linux/**, agent/**)."""
    files = [RECIPE_ROOT / "build.py"]
    for sub in ("linux", "agent"):
        for path in sorted((RECIPE_ROOT / sub).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.append(path)
    return files


def _apt_state_key() -> str:
    """Changes whenever apt's view of the archive or dpkg's installed set changes."""
    digest = hashlib.sha256(os.environ.get("SANDBOX_KERNEL_PACKAGE", "").encode())
    lists = Path("/var/lib/apt/lists")
    paths = sorted(lists.iterdir()) if lists.is_dir() else []
    for path in [*paths, Path("/var/lib/dpkg/status")]:
        with contextlib.suppress(OSError):
            st = path.stat()
            digest.update(f"{path}\0{st.st_mtime_ns}\0{st.st_size}\0".encode())
    return digest.hexdigest()


def _apt_show(*packages: str) -> dict[str, dict[str, str]]:
    """Candidate stanzas (Version, Depends) of ``packages`` in one apt-cache call (~1 s)."""
    out = run("apt-cache", "show", "--no-all-versions", *packages, capture=True)
    stanzas: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in out.splitlines():
        if not line.strip():
            current = {}
            continue
        key, sep, value = line.partition(":")
        if sep and not line[0].isspace():
            current[key] = value.strip()
            if key == "Package":
                stanzas[value.strip()] = current
    return stanzas


def _host_version(package: str) -> str:
    return run("dpkg-query", "-W", "-f=${Version}", package, capture=True).strip()


def resolve_packages() -> dict[str, str]:
    """The Debian package versions the recipe depends on, from the host's apt lists.

    The kernel follows Debian's cloud meta-package (override with SANDBOX_KERNEL_PACKAGE, e.g.
    ``linux-image-6.1.0-56-cloud-amd64``). The rootfs packages debootstrap fetches are not
    pinned individually: python3's candidate version stands for the suite's state, and the
    manifest records every package actually installed. apt-cache is slow, so the answer is
    cached until apt's lists or dpkg's status change.
    """
    key = _apt_state_key()
    memo = cache_root() / "apt-resolution.json"
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(memo.read_text())
        if saved.get("key") == key:
            return dict(saved["packages"])
    try:
        kernel = os.environ.get("SANDBOX_KERNEL_PACKAGE", "")
        if not kernel:
            meta = _apt_show(KERNEL_META_PACKAGE, "python3")
            depends = meta[KERNEL_META_PACKAGE]["Depends"]
            kernel = next(
                d.split()[0] for d in depends.split(",") if d.strip().startswith("linux-image-")
            )
        shown = _apt_show(kernel, "python3")
        packages = {
            "kernel_package": kernel,
            "kernel_version": shown[kernel]["Version"],
            "python3": shown["python3"]["Version"],
            "busybox-static": _host_version("busybox-static"),
            "systemd-boot-efi": _host_version("systemd-boot-efi"),
        }
    except (KeyError, StopIteration) as exc:
        raise SystemExit(
            f"build.py: cannot resolve package versions ({exc}); apt-get update?"
        ) from exc
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "packages": packages}, indent=2))
        tmp.replace(memo)
    return packages


def recipe_hash(packages: dict[str, str] | None = None) -> str:
    packages = packages if packages is not None else resolve_packages()
    digest = hashlib.sha256()
    for path in recipe_files():
        rel = path.relative_to(RECIPE_ROOT).as_posix()
        data = path.read_bytes()
        # Mode matters too: the overlay's executable bits end up in the image.
        digest.update(f"{rel}\0{path.stat().st_mode & 0o777:o}\0{len(data)}\0".encode())
        digest.update(data)
    digest.update(json.dumps(packages, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def kernel_release(package: str) -> str:
    return package.removeprefix("linux-image-")


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialise builds of one recipe across processes (a second builder waits, then no-ops)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def image_id(files: dict[str, dict[str, object]]) -> str:
    """The image's identity: a digest of its boot files' SHA-256s (16 hex digits).

    Content, not recipe: a rebuild of one recipe whose packages moved on is another image, and
    a snapshot taken on the first must not be restored over the second's root filesystem.
    """
    try:
        hashes = {name: files[name]["sha256"] for name in IMAGE_ID_FILES}
    except KeyError as exc:
        raise SystemExit(f"build.py: the manifest lists no {exc} hash") from exc
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]


def write_json(path: Path, data: dict[str, object]) -> None:
    """Write ``path`` whole or not at all (readers never see half a manifest)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def ensure_image_id(dest: Path) -> str:
    """The image id of the built image ``dest``, added to a manifest written before ids existed
    (from the hashes it already lists: nothing is rehashed)."""
    manifest = json.loads((dest / MANIFEST).read_text())
    if "image_id" not in manifest:
        manifest["image_id"] = image_id(manifest["files"])
        manifest.setdefault("recipe_hash", dest.name)
        write_json(dest / MANIFEST, manifest)
    return str(manifest["image_id"])


def point_current(root: Path, dest: Path) -> None:
    """Make ``root/current`` name ``dest`` (relative, so the cache can move), atomically."""
    tmp = root / f".{CURRENT}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(dest.name)
    tmp.replace(root / CURRENT)


def file_entry(path: Path) -> dict[str, object]:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    st = path.stat()
    return {"size": st.st_size, "allocated": st.st_blocks * 512, "sha256": digest.hexdigest()}


# --------------------------------------------------------------------------- kernel + initramfs


def fetch_kernel(packages: dict[str, str], work: Path) -> Path:
    """Download and unpack the kernel package; return the unpacked tree."""
    debs = cache_root() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    name, version = packages["kernel_package"], packages["kernel_version"]
    deb = debs / f"{name}_{version.replace(':', '%3a')}_amd64.deb"
    if not deb.exists():
        step(f"downloading {name} {version}")
        run(
            "apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{name}={version}",
            cwd=debs,
        )  # fmt: skip
    else:
        step(f"using cached {deb.name}")
    tree = work / "kernel-pkg"
    run("dpkg-deb", "-x", deb, tree)
    return tree


def _modinfo_depends(ko: Path) -> list[str]:
    # The .modinfo section is a run of NUL-separated key=value strings; no need for modinfo(8).
    data = ko.read_bytes()
    marker = b"\0depends="
    at = data.find(marker)
    if at < 0:
        return []
    end = data.index(b"\0", at + len(marker))
    value = data[at + len(marker) : end].decode()
    return [d for d in value.split(",") if d]


def module_order(module_dir: Path) -> list[tuple[str, Path]]:
    """MODULES plus their dependencies, each after everything it depends on."""
    index = {p.stem: p for p in module_dir.rglob("*.ko")}
    # Module names in "depends" use underscores even where the file has dashes (virtio-rng).
    by_name = {stem.replace("-", "_"): stem for stem in index}
    order: list[str] = []

    def visit(stem: str, trail: tuple[str, ...]) -> None:
        if stem in order:
            return
        if stem in trail:
            raise SystemExit(f"build.py: module dependency cycle: {' -> '.join(trail)}")
        if stem not in index:
            raise SystemExit(f"build.py: module {stem} not in the kernel package")
        for dep in _modinfo_depends(index[stem]):
            visit(by_name.get(dep, dep), (*trail, stem))
        order.append(stem)

    for mod in MODULES:
        visit(mod, ())
    return [(stem, index[stem]) for stem in order]


def write_newc(root: Path, out: Path) -> None:
    """Pack ``root`` as an uncompressed newc cpio archive (what the kernel unpacks).

    Written here rather than with cpio(1) for reproducibility (mtime 0, owner root, sorted).
    Left uncompressed: the VMM loads it straight into guest memory, and decompressing under TCG
    would cost more boot time than the extra megabytes cost disk.
    """
    ino = 1

    def header(name: str, mode: int, size: int, nlink: int) -> bytes:
        nonlocal ino
        ino += 1
        fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name) + 1, 0)
        head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        return head + b"\0" * (-len(head) % 4)

    with open(out, "wb") as fh:
        entries = sorted(root.rglob("*"))
        for path in entries:
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if path.is_symlink():
                body = os.readlink(path).encode()
            elif path.is_dir():
                body = b""
            else:
                body = path.read_bytes()
            nlink = 2 if path.is_dir() and not path.is_symlink() else 1
            fh.write(header(rel, st.st_mode, len(body), nlink))
            fh.write(body + b"\0" * (-len(body) % 4))
        fh.write(header("TRAILER!!!", 0, 0, 1))
        fh.write(b"\0" * (-fh.tell() % 512))


def build_initramfs(kernel_tree: Path, release: str, work: Path, out: Path) -> list[str]:
    root = work / "initramfs"
    for sub in ("bin", "dev", "proc", "sys", "newroot", "lib/modules"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in INITRAMFS_APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    shutil.copy2(RECIPE_ROOT / "linux" / "initramfs-init", root / "init")
    (root / "init").chmod(0o755)
    order = module_order(kernel_tree / "lib" / "modules" / release / "kernel")
    for stem, ko in order:
        shutil.copy2(ko, root / "lib" / "modules" / f"{stem}.ko")
    (root / "lib" / "modules" / "order").write_text("".join(f"{s}\n" for s, _ in order))
    write_newc(root, out)
    return [stem for stem, _ in order]


# --------------------------------------------------------------------------- root filesystem


# debootstrap's "I: <Verb> <package>..." lines, counted per stage for the progress line.
DEBOOTSTRAP_STAGES = ("Retrieving", "Validating", "Extracting", "Unpacking", "Configuring")
PROGRESS_EVERY_S = 5.0


def debootstrap(tree: Path) -> None:
    """debootstrap into ``tree``, its downloads cached outside the clone; a progress line every
    few seconds (packages per stage), and its last lines when it fails."""
    cache = cache_root() / "debootstrap-debs"
    cache.mkdir(parents=True, exist_ok=True)
    argv = [
        "debootstrap", "--variant=minbase", f"--include={','.join(ROOTFS_INCLUDE)}",
        f"--cache-dir={cache}", SUITE, str(tree), MIRROR,
    ]  # fmt: skip
    counts = dict.fromkeys(DEBOOTSTRAP_STAGES, 0)
    tail: list[str] = []
    shown = time.monotonic()
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = [*tail[-39:], line.rstrip()]
            words = line.split()
            if len(words) > 2 and words[0] == "I:" and words[1] in counts:
                counts[words[1]] += 1
            if time.monotonic() - shown >= PROGRESS_EVERY_S:
                shown = time.monotonic()
                done = ", ".join(f"{k.lower()} {v}" for k, v in counts.items() if v)
                step(f"  debootstrap: {done or 'resolving'} packages")
    if proc.returncode != 0:
        raise SystemExit(f"build.py: debootstrap failed ({proc.returncode}):\n" + "\n".join(tail))


def trim(tree: Path) -> None:
    for pattern in TRIM_GLOBS:
        for path in tree.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    for doc in (tree / "usr/share/doc").glob("*"):
        if doc.is_dir() and not doc.is_symlink():
            for item in doc.iterdir():
                if item.name == "copyright":
                    continue
                if item.is_dir() and not item.is_symlink():
                    shutil.rmtree(item)
                else:
                    item.unlink()


def install_guest_files(tree: Path) -> None:
    """Overlay images/linux/rootfs, the agent and busybox; wire the read-only root to /run."""
    overlay = RECIPE_ROOT / "linux" / "rootfs"
    shutil.copytree(overlay, tree, symlinks=True, dirs_exist_ok=True)
    lib = tree / "usr/lib/sandbox"
    shutil.copy2(BUSYBOX, lib / "busybox")
    shutil.copy2(RECIPE_ROOT / "agent" / "sandbox_agent.py", lib / "sandbox_agent.py")
    # busybox init is PID 1 (no systemd). merged-/usr: /sbin is a link to usr/sbin.
    init = tree / "usr/sbin/init"
    init.unlink(missing_ok=True)
    init.symlink_to("/usr/lib/sandbox/busybox")
    # busybox's ip instead of iproute2 (and its half-dozen libraries): enough for addresses,
    # routes and links, which is all rc.sysinit and the agent's configure do.
    (tree / "usr/local/sbin/ip").symlink_to("/usr/lib/sandbox/busybox")
    for name, target in (
        ("hostname", "/run/hostname"),
        ("hosts", "/run/hosts"),
        ("resolv.conf", "/run/resolv.conf"),
        ("mtab", "/proc/self/mounts"),
    ):
        link = tree / "etc" / name
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    (tree / "data").mkdir(exist_ok=True)
    # The root is read-only: compile the agent and make sure the stdlib's bytecode exists now,
    # with the guest's own interpreter, or every start would compile them again.
    run(
        "chroot", tree, "/usr/bin/python3", "-I", "-c",
        "import compileall, py_compile\n"
        "compileall.compile_dir('/usr/lib/python3.11', quiet=1)\n"
        "py_compile.compile('/usr/lib/sandbox/sandbox_agent.py',"
        " cfile='/usr/lib/sandbox/sandbox_agent.pyc', doraise=True,"
        " invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)\n",
    )  # fmt: skip


def tree_bytes(tree: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def make_rootfs(tree: Path, out: Path, fs_uuid: str) -> None:
    # Headroom only for ext4's own metadata: the root is mounted read-only, guests write to
    # tmpfs and /data. No journal: nothing ever writes to this filesystem after mkfs.
    size_mib = int(tree_bytes(tree) * 1.15 / (1 << 20)) + 32
    run(
        "mkfs.ext4", "-q", "-F", "-d", tree, "-L", ROOTFS_LABEL, "-U", fs_uuid,
        "-E", f"root_owner=0:0,hash_seed={fs_uuid}", "-O", "^has_journal", "-m", "0",
        out, f"{size_mib}M",
    )  # fmt: skip


def installed_packages(tree: Path) -> dict[str, str]:
    out = run(
        "dpkg-query", f"--admindir={tree}/var/lib/dpkg", "-W", "-f=${Package} ${Version}\\n",
        capture=True,
    )  # fmt: skip
    return dict(line.split(" ", 1) for line in out.splitlines() if line)


# --------------------------------------------------------------------------- UEFI


def _pe_image_end(stub: Path) -> int:
    out = run("objdump", "-h", stub, capture=True)
    end = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].isdigit():
            end = max(end, int(parts[3], 16) + int(parts[2], 16))
    return end


def build_uki(kernel: Path, initramfs: Path, cmdline: str, work: Path, out: Path) -> None:
    """systemd-stub + .osrel/.cmdline/.linux/.initrd sections: one EFI binary that boots."""
    align = 0x10000
    osrel = work / "os-release"
    osrel.write_text('NAME="MicroVM Sandbox guest"\nID=sandbox\n')
    cmd_file = work / "cmdline.txt"
    cmd_file.write_text(cmdline)
    sections = [
        (".osrel", osrel),
        (".cmdline", cmd_file),
        (".linux", kernel),
        (".initrd", initramfs),
    ]
    # Each section goes after the stub's own image and the previous section, aligned; the stub
    # reads them by name, so only non-overlap matters.
    vma = -(-_pe_image_end(EFI_STUB) // align) * align
    args: list[str | Path] = ["objcopy"]
    for name, path in sections:
        args += ["--add-section", f"{name}={path}", "--change-section-vma", f"{name}={vma:#x}"]
        vma += -(-path.stat().st_size // align) * align
    run(*args, EFI_STUB, out)


def build_esp_disk(uki: Path, out: Path) -> None:
    """A GPT disk whose only partition is a FAT ESP holding \\EFI\\BOOT\\BOOTX64.EFI."""
    start_sector = 2048
    esp_sectors = ESP_SIZE_MIB * 2048
    total = (start_sector + esp_sectors + 2048) * 512  # + room for the backup GPT
    with open(out, "wb") as fh:
        fh.truncate(total)
    table = (
        f'label: gpt\nstart={start_sector}, size={esp_sectors}, type={ESP_TYPE_GUID}, name="ESP"\n'
    )
    subprocess.run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(out)],
        input=table, text=True, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    image = f"{out}@@{start_sector * 512}"
    # -T sectors at FAT16 cluster defaults; mtools refuses nothing as long as sizes agree.
    run("mformat", "-i", image, "-T", str(esp_sectors), "-v", "SANDBOXESP", "::")
    run("mmd", "-i", image, "::/EFI", "::/EFI/BOOT")
    run("mcopy", "-i", image, uki, "::/EFI/BOOT/BOOTX64.EFI")


# --------------------------------------------------------------------------- driver


def build_base(dest: Path, packages: dict[str, str], digest: str) -> None:
    release = kernel_release(packages["kernel_package"])
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{digest}-", dir=dest.parent))
    try:
        out = tmp / "out"
        out.mkdir()
        work = tmp / "work"
        work.mkdir()
        kernel_tree = fetch_kernel(packages, work)
        shutil.copy2(kernel_tree / "boot" / f"vmlinuz-{release}", out / "vmlinuz")
        step("building initramfs")
        modules = build_initramfs(kernel_tree, release, work, out / "initramfs.cpio")
        step(f"debootstrap --variant=minbase {SUITE} (the slow step: a minute or more)")
        tree = work / "rootfs"
        debootstrap(tree)
        step("trimming the rootfs and installing the agent and init")
        trim(tree)
        install_guest_files(tree)
        tree_size = tree_bytes(tree)
        pkgs = installed_packages(tree)
        step("packing rootfs.ext4 (mkfs.ext4 -d)")
        fs_uuid = str(uuid.UUID(hashlib.sha256(digest.encode()).hexdigest()[:32]))
        make_rootfs(tree, out / "rootfs.ext4", fs_uuid)
        files = {p.name: file_entry(p) for p in sorted(out.iterdir())}
        manifest = {
            "recipe_hash": digest,
            "image_id": image_id(files),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - started, 1),
            "kernel_release": release,
            "packages": packages,
            "initramfs_modules": modules,
            "rootfs_label": ROOTFS_LABEL,
            "rootfs_uuid": fs_uuid,
            "rootfs_tree_bytes": tree_size,
            "rootfs_packages": pkgs,
            "files": files,
        }
        write_json(out / MANIFEST, manifest)
        out.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_uefi(base: Path) -> None:
    dest = base / "uefi"
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=".uefi-", dir=base))
    try:
        out = tmp / "out"
        out.mkdir()
        step("building the unified kernel image (systemd-stub + kernel + initramfs)")
        build_uki(base / "vmlinuz", base / "initramfs.cpio", UKI_CMDLINE, tmp, out / "BOOTX64.EFI")
        step("building the GPT disk with the FAT ESP (sfdisk + mtools)")
        build_esp_disk(out / "BOOTX64.EFI", out / "esp.img")
        manifest = {
            "image_id": ensure_image_id(base),
            "build_seconds": round(time.monotonic() - started, 1),
            "cmdline": UKI_CMDLINE,
            "rootfs": "../rootfs.ext4",
            "files": {p.name: file_entry(p) for p in sorted(out.iterdir())},
        }
        write_json(out / MANIFEST, manifest)
        out.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uefi", action="store_true", help="also build the UEFI disk")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument(
        "--print-dir", action="store_true", help="print the image directory and exit"
    )
    args = parser.parse_args(argv)

    packages = resolve_packages()
    digest = recipe_hash(packages)
    dest = cache_root() / digest
    if args.print_dir:
        print(dest)
        return 0
    with locked(cache_root() / f".lock-{digest}"):
        if args.force and dest.exists():
            need_root()
            step(f"--force: removing {dest}")
            shutil.rmtree(dest)
        if (dest / MANIFEST).exists():
            step("base image up to date")
        else:
            need_root()
            step(f"building recipe {digest} (kernel {packages['kernel_package']})")
            build_base(dest, packages, digest)
        ident = ensure_image_id(dest)
        if args.uefi:
            if (dest / "uefi" / MANIFEST).exists():
                step("UEFI image up to date")
            else:
                need_root()
                build_uefi(dest)
        point_current(cache_root(), dest)
        step(f"image {ident} is current")
    print(dest)
    return 0


def need_root() -> None:
    # An image that is up to date needs no root: only building does (debootstrap, chroot).
    if os.geteuid() != 0:
        raise SystemExit("build.py: debootstrap and chroot need root")


if __name__ == "__main__":
    sys.exit(main())
