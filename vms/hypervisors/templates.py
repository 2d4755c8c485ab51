"""Fast start: boot a template guest once, save it, start new VMs by restoring that state.

A cold boot costs about 4-5 CPU-seconds under TCG; a restore about a tenth of that. So the first
VM of a given *shape* (image files, kernel command line, vCPUs, memory, disk layout, QEMU version
and accelerator) boots a template guest, waits until its agent answers, snapshots it into
``<cache>/<key>/`` and destroys it. Every later VM of that shape is a restore of that state with
its own copies of the writable disks, after which the agent resets the guest's clock (it lags by
the time spent saved) and its identity (hostname, network). Cold boot stays the fallback whenever
a template cannot be used (a data disk with data, or any failure).

NICs: a virtio-net device carries its MAC in the saved state, so every VM restored from a
template starts with the template's MAC. The template is built with the same number of NICs on
the first VM's own TAPs, with MACs of its own (locally administered, derived from the key:
``template_mac``), unplugged (``set_link``) while it boots; the caller's ``wait_ready`` takes
them down in the guest before it is saved (``vms.agent.readiness``), and a restore makes no
announcement (QEMU: ``RESTORE_ARGS``), so nothing ever goes out with the shared MAC. After the
restore, ``reset_identity`` finds each NIC in the guest by the MAC the driver reports for it
(``nic_macs``) and gives it the VM's MAC, address, gateway and resolvers through the agent.

The template guest's agent is enrolled by ``wait_ready`` with a credential of the template's
own, which the cache keeps beside the saved state (``guest-secret``, mode 0600; the saved RAM
holds only its SHA-256) and hands to ``reset_identity`` and, in ``StartResult.guest_secret``, to
the caller, who gives each VM a credential of its own at once.

The cache survives across processes; building a template is serialised by a file lock so that
two workers do not boot the same template twice.

It serves any driver that can say what of itself decides whether a saved guest fits a spec
(``TemplateDriver.template_shape``); a driver offers it through ``Hypervisor.template_cache``.
What concerns the guest (its agent's readiness, its identity after a restore) and its disks comes
from the caller (``TemplateHooks``): drivers know neither.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from .base import (
    DiskSpec,
    Hypervisor,
    HypervisorError,
    NetSpec,
    RuntimeDir,
    SnapshotFiles,
    StartResult,
    TemplateHooks,
    VMSpec,
)

__all__ = [
    "StartResult",
    "TemplateCache",
    "TemplateDriver",
    "default_cache_dir",
    "disk_is_fresh",
    "template_mac",
]

log = logging.getLogger(__name__)


class TemplateDriver(Hypervisor, Protocol):
    """A driver whose saved guests a ``TemplateCache`` can restore."""

    def template_shape(self, spec: VMSpec) -> dict[str, object]:
        """What of the VMM, beyond the spec's files and sizes, a saved guest must match to be
        restored for ``spec`` (its version, accelerator, command line): part of the key."""
        ...

    def set_link(self, runtime: RuntimeDir, nic_id: str, up: bool) -> None:
        """Plug or unplug NIC ``nic_id``'s cable (only for specs with NICs)."""
        ...


def default_cache_dir() -> Path:
    """``$SANDBOX_TEMPLATE_CACHE``, else ``~/.cache/microvm-sandbox/templates``."""
    if os.environ.get("SANDBOX_TEMPLATE_CACHE"):
        return Path(os.environ["SANDBOX_TEMPLATE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "microvm-sandbox" / "templates"


def template_mac(key: str, index: int) -> str:
    """The MAC of a template's NIC ``index``: locally administered, unicast, from the key."""
    digest = hashlib.sha256(f"{key}/{index}".encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in digest[:5])


GUEST_SECRET = "guest-secret"  # noqa: S105 - a file name, not a secret

_EXT4_MAGIC = 0xEF53


def disk_is_fresh(path: Path) -> bool:
    """True if a raw disk holds nothing a guest wrote: an ext4 never mounted (mkfs leaves the
    superblock's mount count and last-mount time at zero; the first mount sets them), or a
    disk whose first 64 KiB are zero. Anything else, or an unreadable disk, is not fresh."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64 * 1024)
    except OSError:
        return False
    sb = head[1024:2048]
    if len(sb) == 1024 and struct.unpack_from("<H", sb, 0x38)[0] == _EXT4_MAGIC:
        mount_time = struct.unpack_from("<I", sb, 0x2C)[0]
        mount_count = struct.unpack_from("<H", sb, 0x34)[0]
        return mount_time == 0 and mount_count == 0
    return not any(head)


class TemplateCache:
    """Saved template guests keyed by shape; ``start()`` restores from them."""

    def __init__(
        self,
        hypervisor: TemplateDriver,
        hooks: TemplateHooks,
        *,
        cache_dir: Path | None = None,
        scratch_root: Path | None = None,
        boot_timeout: float = 180.0,
    ) -> None:
        self.hv = hypervisor
        self.hooks = hooks
        self.cache_dir = cache_dir or default_cache_dir()
        # Template VMs need a runtime dir with short socket paths.
        self.scratch_root = scratch_root
        self.boot_timeout = boot_timeout

    # -- keys --------------------------------------------------------------------------------
    def usable_for(self, spec: VMSpec) -> str | None:
        """None if a template can serve ``spec``, else the reason it cannot.

        A restore puts the template's copy of each writable disk in place of the VM's (the
        saved guest RAM has that filesystem mounted), so a template may only serve a VM whose
        writable disks hold nothing yet: restarting a VM that has data must cold-boot.
        """
        if spec.boot != "linux":
            return "templates are for microvm Linux guests"
        for d in spec.disks:
            if d.readonly:
                continue
            if d.format != "raw":
                return "template data disks must be raw"
            if not disk_is_fresh(d.path):
                return f"data disk {d.path.name} has been used: cold boot keeps its contents"
        return None

    def key(self, spec: VMSpec) -> str:
        def ident(p: Path | None) -> list[object]:
            if p is None:
                return []
            st = p.stat()
            return [str(p), st.st_size, st.st_mtime_ns]

        shape = {
            "kernel": ident(spec.kernel),
            "initramfs": ident(spec.initramfs),
            "cmdline": spec.cmdline,
            "vcpus": spec.vcpus,
            "memory_mib": spec.memory_mib,
            "disks": [
                ident(d.path) if d.readonly else ["rw", d.format, d.path.stat().st_size]
                for d in spec.disks
            ],
            # NICs by number only: TAPs, MACs and addresses are the VM's, set after a restore.
            "nets": len(spec.nets),
            **self.hv.template_shape(spec),
        }
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:24]

    # -- building ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(self.cache_dir / f".{key}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def lookup(self, spec: VMSpec) -> SnapshotFiles | None:
        # A template's directory is complete or absent: it is renamed into place only after
        # its snapshot was written (``_build``).
        directory = self.cache_dir / self.key(spec)
        if directory.is_dir():
            files = (p for p in directory.iterdir() if p.name != GUEST_SECRET)
            return SnapshotFiles(directory, tuple(sorted(files)))
        return None

    @staticmethod
    def guest_secret(snap: SnapshotFiles) -> str | None:
        """What the template's saved guest wants from its host (``wait_ready``'s answer)."""
        try:
            return (snap.directory / GUEST_SECRET).read_text().strip() or None
        except FileNotFoundError:
            return None

    def ensure(self, spec: VMSpec) -> SnapshotFiles:
        """The template snapshot for ``spec``'s shape, booting and saving it if missing."""
        reason = self.usable_for(spec)
        if reason:
            raise HypervisorError(reason)
        found = self.lookup(spec)
        if found:
            return found
        key = self.key(spec)
        with self._lock(key):
            found = self.lookup(spec)
            if found:
                return found
            return self._build(spec, key)

    def _build(self, spec: VMSpec, key: str) -> SnapshotFiles:
        # Short and private: the template's sockets live here.
        work = Path(tempfile.mkdtemp(prefix="tpl-", dir=self.scratch_root))
        runtime = RuntimeDir(work / "rt")
        staging = self.cache_dir / f".{key}.{uuid.uuid4().hex[:6]}"
        staging.mkdir(parents=True)
        try:
            disks = []
            for i, d in enumerate(spec.disks):
                if d.readonly:
                    disks.append(d)
                    continue
                path = work / f"disk{i}.raw"
                self.hooks.make_disk(path, d.path.stat().st_size >> 20)
                disks.append(DiskSpec(path, False, "raw", d.id))
            # The template's NICs use the first VM's TAPs (the VMM gets its own copy of each
            # descriptor; the guest takes them down before the save) with MACs of their own.
            nets = tuple(
                NetSpec(net.tap, template_mac(key, i), net.id, fd=net.fd, netns=net.netns)
                for i, net in enumerate(spec.nets)
            )
            nic_ids = [net.id or f"net{i}" for i, net in enumerate(nets)]
            tpl = spec.replace(vm_id=f"template-{key[:12]}", disks=tuple(disks), nets=nets)
            t0 = time.monotonic()
            self.hv.start(tpl, runtime)
            # Cables out while the guest boots (its init brings eth0 up, and it would announce
            # the template's MAC on the first VM's TAP); in again once wait_ready has taken the
            # NICs down in the guest, so restored guests come back with carrier.
            for nid in nic_ids:
                self.hv.set_link(runtime, nid, False)
            secret = self.hooks.wait_ready(self.hv, runtime, self.boot_timeout)
            for nid in nic_ids:
                self.hv.set_link(runtime, nid, True)
            # Let the guest settle (agent fully idle) so every restore starts from quiet state.
            time.sleep(0.5)
            self.hv.snapshot(runtime, staging)
            if secret is not None:
                fd = os.open(staging / GUEST_SECRET, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(secret)
            log.info("template %s built in %.1fs", key, time.monotonic() - t0)
            self.hv.destroy(runtime)
            final = self.cache_dir / key
            staging.rename(final)
            found = self.lookup(spec)
            assert found is not None
            return found
        except BaseException:
            with contextlib.suppress(Exception):
                self.hv.destroy(runtime)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def drop(self, spec: VMSpec) -> None:
        shutil.rmtree(self.cache_dir / self.key(spec), ignore_errors=True)

    # -- starting ----------------------------------------------------------------------------
    def start(
        self,
        spec: VMSpec,
        runtime: RuntimeDir,
        *,
        fallback: bool = True,
        network_ready: Callable[[], None] | None = None,
    ) -> StartResult:
        """Start ``spec`` from its template (building it if needed), reset clock and identity.

        On any failure of the fast path (and for specs no template serves), cold-boot instead
        when ``fallback`` is true. A cold-booted VM is returned as soon as QEMU runs; a restored
        one when its agent has been reconfigured.

        ``network_ready`` (when the caller still sets up the host side of the NICs while the
        VMM starts) is called before anything can bring a guest's link up: after a restore,
        before the identity is reset (a restored guest's NICs are down until then); before a
        cold boot or a template build. It returns once the NICs are plugged, or raises why not.
        """
        t0 = time.monotonic()
        ready = network_ready or (lambda: None)
        reason = self.usable_for(spec)
        if reason is None:
            try:
                snap = self.lookup(spec)
                if snap is None:
                    ready()  # the template guest boots on these NICs
                    snap = self.ensure(spec)
                pid = self.hv.restore(spec, runtime, snap)
                ready()
                secret = self.guest_secret(snap)
                self.hooks.reset_identity(self.hv, runtime, spec, secret)
                return StartResult(pid, True, time.monotonic() - t0, guest_secret=secret)
            except Exception as exc:  # agent errors too: any failure means "cold boot instead"
                if not fallback:
                    raise
                reason = f"restore failed: {exc}"
                log.warning("template start of %s failed, cold boot: %s", spec.vm_id, exc)
                with contextlib.suppress(Exception):
                    self.hv.stop_hard(runtime)
        elif not fallback:
            raise HypervisorError(reason)
        ready()
        pid = self.hv.start(spec, runtime)
        return StartResult(pid, False, time.monotonic() - t0, reason)
