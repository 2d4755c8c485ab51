"""Which VMM and accelerator can run guests on this host, proven by running one.

``/dev/kvm`` existing (and even answering ``KVM_GET_API_VERSION``) is not proof: on our
development machines it is a paravirtual module on which stock guests hang. So ``kvm_usable()``
boots a real Linux kernel under ``qemu -accel kvm`` with no root device and ``panic=-1``: a
working KVM gets through the kernel's early boot (timers, APIC, SMP bring-up), panics on the
missing root within about a second and QEMU exits (``-no-reboot``); a broken one never gets
there and is killed at the timeout. The verdict is cached per boot and kernel release, in memory
and on disk, so the (slow, on a broken host) probe runs once per host boot.

Below the drivers: the QEMU driver asks it which accelerator to use, and ``selection`` which
driver to pick.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["KVM_PROBE_TIMEOUT", "kvm_usable", "probe_cache_path"]

KVM_PROBE_TIMEOUT = float(os.environ.get("SANDBOX_KVM_PROBE_TIMEOUT", "15"))
_KVM_GET_API_VERSION = 0xAE00
_memo: dict[str, tuple[bool, str]] = {}
_memo_lock = threading.Lock()


def probe_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "microvm-sandbox" / "kvm-probe.json"


def _boot_key() -> str:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    return f"{boot_id}/{os.uname().release}"


def _probe_kernel() -> Path | None:
    """A guest kernel to probe with: ``SANDBOX_PROBE_KERNEL``, else the built guest image's,
    else none (the probe does not build images)."""
    env = os.environ.get("SANDBOX_PROBE_KERNEL")
    if env:
        return Path(env) if Path(env).is_file() else None
    cache = Path(
        os.environ.get("SANDBOX_IMAGE_CACHE")
        or Path.home() / ".cache" / "microvm-sandbox" / "images"
    )
    kernels = sorted(cache.glob("*/vmlinuz"), key=lambda p: p.stat().st_mtime, reverse=True)
    return kernels[0] if kernels else None


def _run_probe(qemu: str, timeout: float) -> tuple[bool, str]:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"/dev/kvm not usable: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    except OSError as exc:
        return False, f"KVM_GET_API_VERSION failed: {exc.strerror}"
    finally:
        os.close(fd)
    if version != 12:
        return False, f"unexpected KVM API version {version}"
    kernel = _probe_kernel()
    if kernel is None:
        return False, "no guest kernel to probe KVM with (build the guest image first)"
    if shutil.which(qemu) is None:
        return False, f"{qemu} not found to probe KVM with"
    with tempfile.TemporaryDirectory(prefix="kvmprobe-") as tmp:
        log = Path(tmp) / "serial.log"
        argv = [
            qemu,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-M",
            "microvm",
            "-m",
            "128M",
            "-smp",
            "2",
            "-kernel",
            str(kernel),
            "-append",
            "console=ttyS0 panic=-1 root=/dev/nonexistent rootwait=0",
            "-serial",
            f"file:{log}",
        ]
        started = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return False, (
                f"a guest kernel did not get to its root mount on KVM within {timeout:.0f}s "
                "(KVM present but guests hang)"
            )
        elapsed = time.monotonic() - started
        text = log.read_text(errors="replace") if log.exists() else ""
    if "Kernel panic" in text or "VFS:" in text:
        return True, f"a guest kernel booted to its root mount on KVM in {elapsed:.1f}s"
    return False, (
        f"KVM guest exited ({proc.returncode}) without booting: "
        f"{err.decode(errors='replace').strip()[-300:] or text[-300:]}"
    )


def kvm_usable(*, refresh: bool = False, qemu: str = "qemu-system-x86_64") -> tuple[bool, str]:
    """(usable, reason). Cached per host boot and kernel; ``refresh`` probes again."""
    key = _boot_key()
    with _memo_lock:
        if not refresh and key in _memo:
            return _memo[key]
        cache = probe_cache_path()
        if not refresh:
            try:
                saved = json.loads(cache.read_text())
                if saved.get("key") == key:
                    verdict = (bool(saved["usable"]), str(saved["reason"]))
                    _memo[key] = verdict
                    return verdict
            except (OSError, ValueError, KeyError):
                pass
        verdict = _run_probe(qemu, KVM_PROBE_TIMEOUT)
        _memo[key] = verdict
        # A missing kernel is not a verdict about KVM: do not persist it.
        if "no guest kernel" not in verdict[1]:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(".tmp")
                tmp.write_text(json.dumps({"key": key, "usable": verdict[0], "reason": verdict[1]}))
                tmp.replace(cache)
            except OSError:
                pass
        else:
            _memo.pop(key, None)
        return verdict
