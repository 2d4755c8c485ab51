"""The QEMU driver: ``microvm`` + direct kernel boot for Linux, ``q35`` + OVMF for UEFI.

This is the VMM that boots real guests on machines without Cloud Hypervisor. Design notes (the
measurements behind them are in ``../shared/guest-notes.md``; the full write-up is
``docs/hypervisors.md``):

* Command lines are argv lists built from a ``VMSpec`` and a ``RuntimeDir``; nothing goes through
  a shell. Values placed inside QEMU's comma-separated option strings are escaped (``,`` -> ``,,``)
  and VM ids are restricted to a safe alphabet.
* Control is QMP on ``control.sock``; the serial console is a socket with a ``logfile`` (so output
  is kept while nobody is attached); the agent is a virtio-serial port on ``agent.sock``.
* ``-accel tcg,tb-size=32`` unless ``probe.kvm_usable()`` proved that KVM runs a guest.
* ``-no-shutdown``: a guest power-off leaves QEMU alive in the ``shutdown`` state, so a clean
  shutdown (``VMState.SHUTDOWN``) is distinguishable from a crashed VMM (no process).
* Snapshots migrate to a file descriptor (``getfd`` + ``migrate fd:``) rather than
  ``exec:cat > STATE``: same result, but no shell, no quoting of paths and no helper process, so
  the seccomp sandbox can deny ``spawn``. Restore passes the state file as an inherited fd to
  ``-incoming fd:N`` on an otherwise identical command line.
* The driver is stateless between calls: everything it needs later (the spec, the accelerator,
  the argv) is written to ``vm.json`` in the runtime directory, so a restarted worker can still
  pause, snapshot or destroy a VM it did not start.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import jail, process
from .base import (
    DiskSpec,
    HypervisorError,
    NetSpec,
    NotSupported,
    RuntimeDir,
    SnapshotFiles,
    TemplateHooks,
    VMInfo,
    VMSpec,
    VMState,
)
from .probe import kvm_usable
from .qmp import QMPClient, QMPConnectionLost
from .templates import TemplateCache

__all__ = [
    "QEMU_BINARY",
    "QemuHypervisor",
    "SNAPSHOT_MANIFEST",
    "spec_from_dict",
    "spec_to_dict",
]

QEMU_BINARY = os.environ.get("SANDBOX_QEMU", "qemu-system-x86_64")
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
SNAPSHOT_MANIFEST = "snapshot.json"
SNAPSHOT_STATE = "state.bin"
SNAPSHOT_FORMAT = 1
VM_FILE = "vm.json"
VARS_FILE = "OVMF_VARS.fd"

log = logging.getLogger(__name__)

# After an incoming migration QEMU announces every NIC's MAC (RARP, and the guest is asked for
# gratuitous ARPs) to update switches, as a VM moved between hosts needs. A restore never moves
# a VM, and a guest restored from a template still has the template's MAC at that moment:
# announcing it would teach the bridge a MAC that several VMs share. So no announcement.
RESTORE_ARGS = ("-global", "migration.announce-rounds=0", "-incoming")

_VM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_NETNS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")  # a /run/netns entry (as vms.network)
_DEV_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")

# QEMU run states, folded into the protocol's VMState.
_PAUSED_STATES = {
    "paused",
    "postmigrate",
    "prelaunch",
    "inmigrate",
    "finish-migrate",
    "save-vm",
    "restore-vm",
    "suspended",
    "debug",
    "io-error",
    "internal-error",
    "guest-panicked",
    "watchdog",
    "colo",
}


def _opt(value: str | Path) -> str:
    """Escape a value for a QEMU ``key=value,key=value`` option string."""
    return str(value).replace(",", ",,")


def spec_to_dict(spec: VMSpec) -> dict[str, Any]:
    """A JSON-ready form of a spec (paths as strings)."""
    raw = asdict(spec)
    for key in ("kernel", "initramfs", "firmware_code", "firmware_vars"):
        if raw[key] is not None:
            raw[key] = str(raw[key])
    raw["disks"] = [{**d, "path": str(d["path"])} for d in raw["disks"]]
    # A descriptor means nothing to a later process: never recorded.
    raw["nets"] = [{k: v for k, v in n.items() if k != "fd"} for n in raw["nets"]]
    return raw


def spec_from_dict(raw: dict[str, Any]) -> VMSpec:
    def path(v: Any) -> Path | None:
        return None if v is None else Path(v)

    return VMSpec(
        vm_id=raw["vm_id"],
        boot=raw["boot"],
        vcpus=raw["vcpus"],
        max_vcpus=raw.get("max_vcpus"),
        memory_mib=raw["memory_mib"],
        max_memory_mib=raw.get("max_memory_mib"),
        kernel=path(raw.get("kernel")),
        initramfs=path(raw.get("initramfs")),
        cmdline=raw.get("cmdline", ""),
        firmware_code=path(raw.get("firmware_code")),
        firmware_vars=path(raw.get("firmware_vars")),
        disks=tuple(
            DiskSpec(Path(d["path"]), d["readonly"], d["format"], d.get("id", ""))
            for d in raw.get("disks", ())
        ),
        nets=tuple(
            NetSpec(
                n["tap"],
                n["mac"],
                n.get("id", ""),
                netns=n.get("netns", ""),
                address=n.get("address", ""),
                gateway=n.get("gateway", ""),
                dns=tuple(n.get("dns", ())),
            )
            for n in raw.get("nets", ())
        ),
        extra=dict(raw.get("extra", {})),
        balloon=bool(raw.get("balloon", False)),  # saved before balloons: none
    )


def _shape(spec: VMSpec) -> dict[str, Any]:
    """What must be equal between a snapshot and the VM restored from it (the guest-visible
    hardware); paths, tap names and the VM id may differ."""
    return {
        "boot": spec.boot,
        "vcpus": spec.vcpus,
        "max_vcpus": spec.max_vcpus,
        "memory_mib": spec.memory_mib,
        "max_memory_mib": spec.max_memory_mib,
        "disks": [(d.readonly, d.format) for d in spec.disks],
        "nets": len(spec.nets),
        "cmdline": spec.cmdline,
    }


def _vars_template(code: Path) -> Path:
    """The pristine variable store that matches a firmware code file (2M and 4M builds differ)."""
    name = code.name.replace("CODE", "VARS").replace(".secboot", ".ms")
    candidate = code.with_name(name)
    return candidate if candidate.is_file() else OVMF_VARS


def _copy_file(src: Path, dst: Path) -> None:
    """Copy a disk image, sparse and with reflinks where the filesystem has them."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    result = subprocess.run(
        ["cp", "--reflink=auto", "--sparse=always", "--", str(src), str(tmp)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise HypervisorError(f"copying {src} to {dst} failed: {result.stderr.strip()}")
    tmp.replace(dst)


_TAP_KEYS = ("rx_bytes", "rx_packets", "rx_dropped", "tx_bytes", "tx_packets", "tx_dropped")


_LIBC = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


def _net_dev_in(ns: str, timeout: float = 5.0) -> str | None:
    """``/proc/net/dev`` as namespace ``ns`` sees it, read by a short-lived thread that joins
    it (``setns`` moves only the calling thread): no process is forked, unlike a netlink socket
    opened in the namespace, so sampling many VMs stays cheap. None: unreadable."""
    found: dict[str, str] = {}

    def read() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _LIBC.setns(fd, _CLONE_NEWNET) != 0:
                    return
            finally:
                os.close(fd)
            found["text"] = Path("/proc/thread-self/net/dev").read_text()
        except OSError:
            return

    reader = threading.Thread(target=read, name=f"netdev-{ns}", daemon=True)
    reader.start()
    reader.join(timeout)
    return found.get("text")


def _parse_net_dev(text: str, names: set[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines()[2:]:
        ifname, _, rest = line.partition(":")
        if ifname.strip() in names:
            f = [int(x) for x in rest.split()]
            picked = (f[0], f[1], f[3], f[8], f[9], f[11])  # the columns of _TAP_KEYS
            out[ifname.strip()] = dict(zip(_TAP_KEYS, picked, strict=True))
    return out


def _tap_stats(ns: str, pid: int, names: set[str]) -> dict[str, dict[str, int]]:
    """Counters of the TAPs ``names`` as the host sees them: read in namespace ``ns`` (TAPs
    opened there and passed by descriptor), or from ``/proc/<pid>/net/dev`` (the QEMU process's
    own namespace) when ``ns`` is empty. Unreadable: nothing."""
    if ns:
        if not _NETNS.match(ns) or not os.path.exists(f"/run/netns/{ns}"):
            return {}
        text = _net_dev_in(ns)
    else:
        try:
            text = Path(f"/proc/{pid}/net/dev").read_text()
        except OSError:
            text = None
    return _parse_net_dev(text, names) if text is not None else {}


class QemuHypervisor:
    """``Hypervisor`` implementation for QEMU (see the module docstring)."""

    name = "qemu"
    exe_names: tuple[str, ...] = ("qemu-system-x86_64",)

    def __init__(
        self,
        *,
        binary: str = QEMU_BINARY,
        accel: str = os.environ.get("SANDBOX_QEMU_ACCEL", "auto"),
        tb_size_mib: int = 32,
        start_timeout: float = 15.0,
        qmp_timeout: float = 10.0,
        seccomp: bool = True,
        jail_config: jail.JailConfig | None = None,
    ) -> None:
        if accel not in ("auto", "tcg", "kvm"):
            raise HypervisorError(f"unknown QEMU accelerator {accel!r} (auto, tcg or kvm)")
        self.binary = binary
        self._accel_setting = accel
        self._accel: str | None = None if accel == "auto" else accel
        self.tb_size_mib = tb_size_mib
        self.start_timeout = start_timeout
        self.qmp_timeout = qmp_timeout
        self.seccomp = seccomp
        self.jail = jail_config if jail_config is not None else jail.JailConfig.from_env()
        self.exe_names = (os.path.basename(binary),)

    # -- command line ---------------------------------------------------------------------------
    @property
    def accel(self) -> str:
        """``kvm`` only when a guest was seen running on it (probe), else ``tcg``."""
        if self._accel is None:
            self._accel = "kvm" if kvm_usable()[0] else "tcg"
        return self._accel

    def validate(self, spec: VMSpec, *, restoring: bool = False) -> None:
        """Refuse a spec QEMU cannot run, with a reason an operator can act on.

        ``restoring``: writable disks may be missing (the restore copies them from the snapshot).
        """
        if not _VM_ID.match(spec.vm_id):
            raise HypervisorError(f"invalid vm_id {spec.vm_id!r}: use [A-Za-z0-9_.-], max 64")
        if spec.vcpus < 1 or (spec.max_vcpus is not None and spec.max_vcpus < spec.vcpus):
            raise HypervisorError("vcpus must be >= 1 and <= max_vcpus")
        if spec.memory_mib < 96:
            raise HypervisorError("memory_mib must be at least 96 (the kernel needs ~84 MiB)")
        if spec.boot == "linux":
            if spec.kernel is None or not spec.kernel.is_file():
                raise HypervisorError(f"linux boot needs a kernel file, got {spec.kernel}")
            if spec.initramfs is not None and not spec.initramfs.is_file():
                raise HypervisorError(f"initramfs {spec.initramfs} does not exist")
            if spec.max_vcpus not in (None, spec.vcpus) or spec.max_memory_mib not in (
                None,
                spec.memory_mib,
            ):
                raise NotSupported("the microvm machine has no CPU or memory hotplug")
        elif spec.boot == "uefi":
            code = spec.firmware_code or OVMF_CODE
            if not code.is_file():
                raise HypervisorError(f"UEFI firmware {code} not found (install ovmf)")
            if not spec.disks:
                raise HypervisorError("uefi boot needs a bootable disk")
        else:
            raise HypervisorError(f"unknown boot mode {spec.boot!r}")
        for disk in spec.disks:
            if not disk.path.exists() and not (restoring and not disk.readonly):
                raise HypervisorError(f"disk {disk.path} does not exist")
            if disk.id and not _DEV_ID.match(disk.id):
                raise HypervisorError(f"invalid disk id {disk.id!r}")
        macs = [n.mac.lower() for n in spec.nets]
        for net in spec.nets:
            if not _MAC.match(net.mac.lower()):
                raise HypervisorError(f"invalid MAC {net.mac!r}")
            if int(net.mac[:2], 16) & 1:
                raise HypervisorError(f"MAC {net.mac} is a multicast address")
            if net.id and not _DEV_ID.match(net.id):
                raise HypervisorError(f"invalid net id {net.id!r}")
            if not re.match(r"^[A-Za-z0-9_.-]{1,15}$", net.tap):
                raise HypervisorError(f"invalid tap name {net.tap!r}")
            if net.netns and not _NETNS.match(net.netns):
                raise HypervisorError(f"invalid network namespace name {net.netns!r}")
            if net.fd is not None and (
                isinstance(net.fd, bool) or not isinstance(net.fd, int) or net.fd < 3
            ):
                raise HypervisorError(f"invalid TAP descriptor {net.fd!r} for {net.tap}")
        if len(set(macs)) != len(macs):
            raise HypervisorError("every NIC needs its own MAC address")

    def build_argv(self, spec: VMSpec, runtime: RuntimeDir, accel: str | None = None) -> list[str]:
        """The QEMU command line for ``spec`` (without ``-incoming``)."""
        accel = accel or self.accel
        micro = spec.boot == "linux"
        bus = "device" if micro else "pci"  # virtio-*-device (MMIO) vs virtio-*-pci
        argv = [self.binary, "-name", f"guest={spec.vm_id},debug-threads=on"]
        argv += ["-nodefaults", "-no-user-config", "-display", "none", "-no-shutdown"]
        argv += ["-msg", "timestamp=on"]
        if self.seccomp:
            # fd: migration means QEMU never needs to fork: deny spawn too.
            argv += [
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            ]
        if accel == "kvm":
            argv += ["-accel", "kvm", "-cpu", "host"]
        else:
            argv += ["-accel", f"tcg,tb-size={self.tb_size_mib}"]
        if micro:
            # No option ROMs: qboot loads the kernel itself and it saves boot time.
            argv += ["-M", "microvm,x-option-roms=off"]
            argv += ["-m", f"{spec.memory_mib}M", "-smp", str(spec.vcpus)]
            assert spec.kernel is not None
            argv += ["-kernel", str(spec.kernel)]
            if spec.initramfs is not None:
                argv += ["-initrd", str(spec.initramfs)]
            if spec.cmdline:
                argv += ["-append", spec.cmdline]
        else:
            argv += ["-M", "q35,smm=off"]
            mem = f"{spec.memory_mib}M"
            if spec.max_memory_mib and spec.max_memory_mib > spec.memory_mib:
                mem += f",slots=8,maxmem={spec.max_memory_mib}M"
            argv += ["-m", mem]
            smp = str(spec.vcpus)
            if spec.max_vcpus and spec.max_vcpus > spec.vcpus:
                smp += f",maxcpus={spec.max_vcpus}"
            argv += ["-smp", smp]
            code = spec.firmware_code or OVMF_CODE
            vars_ = spec.firmware_vars or runtime.root / VARS_FILE
            argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_opt(code)}"]
            argv += ["-drive", f"if=pflash,format=raw,unit=1,file={_opt(vars_)}"]
        # Control, console, agent.
        argv += [
            "-chardev",
            f"socket,id=qmp,path={_opt(runtime.control_socket)},server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
            "-chardev",
            f"socket,id=con,path={_opt(runtime.serial_socket)},server=on,wait=off,"
            f"logfile={_opt(runtime.serial_log)},logappend=on",
            "-serial",
            "chardev:con",
            "-device",
            f"virtio-serial-{bus},id=vser0",
            "-chardev",
            f"socket,id=agent,path={_opt(runtime.agent_socket)},server=on,wait=off",
            "-device",
            "virtserialport,bus=vser0.0,chardev=agent,name=sandbox.agent",
            "-object",
            "rng-random,id=rng0,filename=/dev/urandom",
            "-device",
            f"virtio-rng-{bus},rng=rng0",
        ]
        if spec.balloon:
            # Taken back under host pressure (vms.pressure); QEMU frees what the guest gives up.
            argv += ["-device", f"virtio-balloon-{bus},id=balloon0"]
        for i, disk in enumerate(spec.disks):
            did = disk.id or f"disk{i}"
            drive = f"id={did},if=none,file={_opt(disk.path)},format={disk.format}"
            if disk.readonly:
                drive += ",readonly=on"
            argv += ["-drive", drive]
            dev = f"virtio-blk-{bus},drive={did},id={did}-dev"
            if not micro and i == 0:
                dev += ",bootindex=0"
            argv += ["-device", dev]
        for i, net in enumerate(spec.nets):
            nid = net.id or f"net{i}"
            if net.fd is not None:
                # Opened in the TAP's namespace by the caller and inherited (see _net_fds).
                backend = f"tap,id={nid},fd={net.fd}"
            else:
                backend = f"tap,id={nid},ifname={net.tap},script=no,downscript=no"
            argv += [
                "-netdev",
                backend,
                "-device",
                f"virtio-net-{bus},netdev={nid},id={nid}-dev,mac={net.mac.lower()}",
            ]
        return argv

    # -- helpers -----------------------------------------------------------------------------
    def _qmp(self, runtime: RuntimeDir, timeout: float | None = None) -> QMPClient:
        if not self.is_alive(runtime):
            raise HypervisorError(f"no QEMU process for {runtime.root}")
        # Only QEMU's own socket: never one a (jailed) QEMU linked in its place.
        return QMPClient.connect(
            runtime.control_socket, timeout or self.qmp_timeout, peer_pid=runtime.pid()
        )

    def _load_vm(self, runtime: RuntimeDir) -> dict[str, Any]:
        try:
            return json.loads((runtime.root / VM_FILE).read_text())
        except FileNotFoundError as exc:
            raise HypervisorError(f"{runtime.root} holds no VM started by this driver") from exc

    def _save_vm(self, runtime: RuntimeDir, data: dict[str, Any]) -> None:
        # A fresh name (O_EXCL): a jailed VMM may write in this directory, so no fixed name
        # that it could have planted first.
        fd, tmp = tempfile.mkstemp(dir=runtime.root, prefix=".vm.")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=1))
        os.chmod(tmp, 0o644)
        os.replace(tmp, runtime.root / VM_FILE)

    def _log_tail(self, runtime: RuntimeDir, n: int = 8) -> str:
        try:
            lines = runtime.vmm_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        # Our own "--- start: argv" records are long and say nothing about the failure.
        lines = [line for line in lines if not line.startswith("--- ")]
        return " | ".join(lines[-n:])

    def _prepare(self, spec: VMSpec, runtime: RuntimeDir, *, restoring: bool = False) -> None:
        self.validate(spec, restoring=restoring)
        if self.is_alive(runtime):
            raise HypervisorError(f"a VMM is already running in {runtime.root}")
        runtime.create()
        # Stale sockets of a dead VMM: QEMU would replace them, but a client could connect to
        # the old inode meanwhile and get a confusing "connection refused".
        for sock in (runtime.control_socket, runtime.serial_socket, runtime.agent_socket):
            sock.unlink(missing_ok=True)
        runtime.pidfile.unlink(missing_ok=True)

    def _launch(
        self,
        spec: VMSpec,
        runtime: RuntimeDir,
        argv: list[str],
        accel: str,
        pass_fds: tuple[int, ...],
    ) -> int:
        launcher: list[str] = []
        jailed: dict[str, Any] | None = None
        if self.jail.enabled:
            try:
                self.jail.check()
                jail_spec = self.jail_spec(spec, runtime, accel)
            except jail.JailError as exc:
                raise HypervisorError(str(exc)) from exc
            launcher = [*jail.launcher_argv(jail_spec), "--"]
            jailed = {
                "name": jail_spec.name,
                "uid": jail_spec.uid,
                "cpu_weight": jail_spec.cpu_weight,
            }
        else:
            log.warning("%s (VM %s)", jail.OFF_WARNING, spec.vm_id)
        self._save_vm(
            runtime,
            {
                "spec": spec_to_dict(spec),
                "accel": accel,
                "argv": argv,
                "hotplugged": [],
                "jail": jailed,
            },
        )
        tap_fds = tuple(n.fd for n in spec.nets if n.fd is not None)
        pid = process.spawn_vmm(argv, runtime, pass_fds=(*pass_fds, *tap_fds), launcher=launcher)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if not self.is_alive(runtime):
                process.reap(pid)
                raise HypervisorError(f"QEMU exited during start: {self._log_tail(runtime)}")
            try:
                QMPClient.connect(runtime.control_socket, self.qmp_timeout, peer_pid=pid).close()
                return pid
            except (HypervisorError, OSError):
                if time.monotonic() >= deadline:
                    self.stop_hard(runtime)
                    raise HypervisorError(
                        f"QEMU did not answer QMP within {self.start_timeout:.0f}s: "
                        f"{self._log_tail(runtime)}"
                    ) from None
                time.sleep(0.005)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, spec: VMSpec, runtime: RuntimeDir) -> int:
        self._prepare(spec, runtime)
        if spec.boot == "uefi" and spec.firmware_vars is None:
            shutil.copyfile(
                _vars_template(spec.firmware_code or OVMF_CODE), runtime.root / VARS_FILE
            )
        accel = self.accel
        argv = self.build_argv(spec, runtime, accel)
        return self._launch(spec, runtime, argv, accel, ())

    def snapshot_nics(self, snapshot: SnapshotFiles) -> int:
        return len(self._saved_spec(Path(snapshot.directory)).nets)

    def _saved_spec(self, directory: Path) -> VMSpec:
        """The spec a snapshot of this driver was taken with (its manifest's)."""
        try:
            manifest = json.loads((directory / SNAPSHOT_MANIFEST).read_text())
        except FileNotFoundError as exc:
            raise HypervisorError(f"{directory} is not a QEMU snapshot") from exc
        except (OSError, ValueError) as exc:
            raise HypervisorError(f"{directory}/{SNAPSHOT_MANIFEST} is unreadable: {exc}") from exc
        if manifest.get("driver") != self.name or manifest.get("format") != SNAPSHOT_FORMAT:
            raise HypervisorError(
                f"snapshot format {manifest.get('driver')}/{manifest.get('format')} "
                f"is not {self.name}/{SNAPSHOT_FORMAT}"
            )
        return spec_from_dict(manifest["spec"])

    def restore(self, spec: VMSpec, runtime: RuntimeDir, snapshot: SnapshotFiles) -> int:
        """Start a new QEMU from ``snapshot``; the guest is running when this returns.

        The snapshot's copies of writable disks are copied over the new spec's writable disk
        paths (a guest's page cache must match its disk), and the UEFI variable store likewise.

        A NIC's MAC is part of the saved virtio-net state, so the restored device has the
        snapshot's MAC whatever the command line says: the command line carries the snapshot's
        MAC (it describes the device as it is), with the spec's TAPs. A spec whose MAC differs
        (a VM restored from a template) gets it from the guest, which sets it through the
        virtio-net control queue (the agent's ``network`` request); ``nic_macs`` shows it.
        """
        manifest_path = snapshot.directory / SNAPSHOT_MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError as exc:
            raise HypervisorError(f"{snapshot.directory} is not a QEMU snapshot") from exc
        if manifest.get("driver") != self.name or manifest.get("format") != SNAPSHOT_FORMAT:
            raise HypervisorError(
                f"snapshot format {manifest.get('driver')}/{manifest.get('format')} "
                f"is not {self.name}/{SNAPSHOT_FORMAT}"
            )
        saved = spec_from_dict(manifest["spec"])
        if _shape(saved) != _shape(spec):
            raise HypervisorError(
                f"spec does not match the snapshot's hardware: {_shape(saved)} != {_shape(spec)}"
            )
        # The devices are the snapshot's: one saved without a balloon restores without one.
        spec = spec.replace(balloon=saved.balloon)
        self._prepare(spec, runtime, restoring=True)
        for entry in manifest["disks"]:
            target = spec.disks[entry["index"]]
            _copy_file(snapshot.directory / entry["file"], target.path)
        if spec.boot == "uefi":
            vars_target = spec.firmware_vars or runtime.root / VARS_FILE
            _copy_file(snapshot.directory / manifest["firmware_vars"], vars_target)
        accel = manifest["accel"]
        device = spec.replace(
            nets=tuple(
                dataclasses.replace(net, mac=old.mac)
                for net, old in zip(spec.nets, saved.nets, strict=True)
            )
        )
        argv = self.build_argv(device, runtime, accel)
        fd = os.open(snapshot.directory / manifest["state"], os.O_RDONLY | os.O_CLOEXEC)
        try:
            pid = self._launch(spec, runtime, [*argv, *RESTORE_ARGS, f"fd:{fd}"], accel, (fd,))
        except HypervisorError as exc:
            raise HypervisorError(f"restore failed: {exc}") from exc
        finally:
            os.close(fd)
        timeout = 30.0 + manifest.get("state_bytes", 0) / (50 << 20)
        try:
            self._finish_incoming(runtime, timeout)
        except HypervisorError as exc:
            # A failed incoming migration makes QEMU exit by itself; its reason is in vmm.log.
            self.stop_hard(runtime)
            raise HypervisorError(f"restore failed: {exc} | {self._log_tail(runtime, 3)}") from exc
        return pid

    def _finish_incoming(self, runtime: RuntimeDir, timeout: float) -> None:
        """Wait until the incoming state is loaded (status leaves ``inmigrate``), then ``cont``."""
        deadline = time.monotonic() + timeout
        with self._qmp(runtime) as qmp:
            while True:
                status = qmp.execute("query-status")["status"]
                if status != "inmigrate":
                    break
                if time.monotonic() >= deadline:
                    raise HypervisorError(f"state not loaded within {timeout:.0f}s")
                time.sleep(0.005)
            mig = qmp.execute("query-migrate")
            if mig.get("status") == "failed":
                raise HypervisorError(str(mig.get("error-desc", mig)))
            if status != "running":
                qmp.execute("cont")

    def snapshot(self, runtime: RuntimeDir, directory: Path) -> SnapshotFiles:
        """Pause, save RAM and device state to ``directory/state.bin``, copy writable disks.

        Shared read-only disks are referenced by path in ``snapshot.json``, not copied.
        """
        directory = Path(directory)
        if not directory.is_dir() or any(directory.iterdir()):
            raise HypervisorError(f"snapshot directory {directory} must exist and be empty")
        vm = self._load_vm(runtime)
        if vm.get("hotplugged"):
            raise NotSupported(
                "a resized QEMU guest cannot be snapshotted (its hot-plugged devices are not "
                "on the command line a restore would use); restart it with the new shape first"
            )
        spec = spec_from_dict(vm["spec"])
        state = directory / SNAPSHOT_STATE
        files: list[Path] = [state]
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with self._qmp(runtime) as qmp:
                qmp.execute("stop")
                # The default cap is 32 MiB/s; a local file takes whatever we can write.
                qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
                qmp.execute("getfd", {"fdname": "snapstate"}, fds=(fd,))
                qmp.execute("migrate", {"uri": "fd:snapstate"})
                timeout = 30.0 + spec.memory_mib / 50.0
                deadline = time.monotonic() + timeout
                while True:
                    mig = qmp.execute("query-migrate")
                    status = mig.get("status")
                    if status == "completed":
                        break
                    if status in ("failed", "cancelled"):
                        raise HypervisorError(f"saving state failed: {mig.get('error-desc', mig)}")
                    if time.monotonic() >= deadline:
                        with contextlib.suppress(HypervisorError):
                            qmp.execute("migrate_cancel")
                        raise HypervisorError(f"saving state took more than {timeout:.0f}s")
                    time.sleep(0.005)
        finally:
            os.close(fd)
        disks = []
        for i, disk in enumerate(spec.disks):
            if disk.readonly:
                continue
            name = f"disk{i}.{disk.format}"
            _copy_file(disk.path, directory / name)
            files.append(directory / name)
            disks.append({"index": i, "id": disk.id, "file": name, "format": disk.format})
        vars_name = None
        if spec.boot == "uefi":
            vars_name = VARS_FILE
            _copy_file(spec.firmware_vars or runtime.root / VARS_FILE, directory / vars_name)
            files.append(directory / vars_name)
        manifest = {
            "format": SNAPSHOT_FORMAT,
            "driver": self.name,
            "created": datetime.now(UTC).isoformat(),
            "qemu": self._version(),
            "accel": vm["accel"],
            "spec": vm["spec"],
            "state": SNAPSHOT_STATE,
            "state_bytes": state.stat().st_size,
            "disks": disks,
            "shared_disks": [
                {"index": i, "path": str(d.path)} for i, d in enumerate(spec.disks) if d.readonly
            ],
            "firmware_vars": vars_name,
        }
        (directory / SNAPSHOT_MANIFEST).write_text(json.dumps(manifest, indent=1))
        files.append(directory / SNAPSHOT_MANIFEST)
        return SnapshotFiles(directory, tuple(files))

    # -- templates ---------------------------------------------------------------------------
    def template_cache(
        self,
        hooks: TemplateHooks,
        *,
        cache_dir: Path | None = None,
        scratch_root: Path | None = None,
        boot_timeout: float = 180.0,
    ) -> TemplateCache:
        """Fast starts by restoring saved template guests (``templates.TemplateCache``)."""
        return TemplateCache(
            self, hooks, cache_dir=cache_dir, scratch_root=scratch_root, boot_timeout=boot_timeout
        )

    def template_shape(self, spec: VMSpec) -> dict[str, object]:
        """The QEMU version, the accelerator and the command line without the VM's own parts
        (id, disks, NICs): a saved guest is restored only under the same."""
        return {
            "qemu": self._version(),
            "accel": self.accel,
            "argv": self.build_argv(
                spec.replace(vm_id="x", disks=(), nets=()), RuntimeDir(Path("/r"))
            ),
        }

    def _version(self) -> str:
        try:
            out = subprocess.run(
                [self.binary, "--version"], capture_output=True, text=True, timeout=10, check=False
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        return out.splitlines()[0] if out else "unknown"

    def pause(self, runtime: RuntimeDir) -> None:
        with self._qmp(runtime) as qmp:
            qmp.execute("stop")

    def resume(self, runtime: RuntimeDir) -> None:
        with self._qmp(runtime) as qmp:
            qmp.execute("cont")

    def power_button(self, runtime: RuntimeDir) -> None:
        """Press the ACPI power button (q35: ICH9 PM; microvm: the ACPI generic event device).

        The guest decides what to do with it. The Linux image loads the ``button`` driver and
        runs busybox ``acpid``, which powers it off cleanly (about 2 s under TCG); a guest
        without a handler ignores the press: ``graceful_shutdown`` falls back to the agent.
        """
        with self._qmp(runtime) as qmp:
            qmp.execute("system_powerdown")

    def graceful_shutdown(
        self,
        runtime: RuntimeDir,
        agent_shutdown: Callable[[], object] | None = None,
        *,
        button_grace: float = 10.0,
        timeout: float = 30.0,
    ) -> str:
        """Power button first; if the guest has not powered off within ``button_grace`` seconds,
        call ``agent_shutdown`` (e.g. ``AgentClient.shutdown``). Returns ``"acpi"`` or
        ``"agent"`` (the path that worked); raises ``HypervisorError`` if the guest is still up
        at ``timeout``. QEMU stays alive in the ``shutdown`` state (``-no-shutdown``)."""

        def down() -> bool:
            return not self.is_alive(runtime) or self.info(runtime).state is VMState.SHUTDOWN

        self.power_button(runtime)
        if process.wait_for(down, button_grace, 0.1):
            return "acpi"
        if agent_shutdown is None:
            raise HypervisorError(
                f"the guest ignored the power button for {button_grace:.0f}s and no agent "
                "fallback was given"
            )
        agent_shutdown()
        if process.wait_for(down, timeout, 0.1):
            return "agent"
        raise HypervisorError(f"the guest did not power off within {timeout:.0f}s")

    def reboot(self, runtime: RuntimeDir) -> None:
        """Hard reset (like pressing reset): the guest restarts from firmware / kernel."""
        with self._qmp(runtime) as qmp:
            qmp.execute("system_reset")

    def resize(
        self, runtime: RuntimeDir, *, vcpus: int | None = None, memory_mib: int | None = None
    ) -> None:
        vm = self._load_vm(runtime)
        spec = spec_from_dict(vm["spec"])
        if spec.boot == "linux":
            raise NotSupported(
                "the microvm machine has no CPU or memory hotplug: stop the VM and start it "
                "with the new vcpus/memory_mib"
            )
        hotplugged: list[dict[str, Any]] = vm.setdefault("hotplugged", [])
        try:
            with self._qmp(runtime) as qmp:
                if vcpus is not None:
                    self._resize_cpus(qmp, spec, vcpus, hotplugged)
                if memory_mib is not None:
                    self._resize_memory(qmp, spec, memory_mib, hotplugged)
        except QMPConnectionLost as exc:
            # QEMU 7.2 under TCG aborts on a vCPU hotplug when the running vCPUs have claimed
            # every region of the translation buffer (the new vCPU thread's first region
            # allocation asserts: "tcg_region_initial_alloc__locked: assertion failed"). The
            # process is gone with the guest: say so, with QEMU's own last words.
            if process.wait_for(lambda: not self.is_alive(runtime), 2.0, 0.05):
                raise HypervisorError(
                    f"QEMU crashed during the resize; the VM is gone: {self._log_tail(runtime, 3)}"
                ) from exc
            raise
        self._save_vm(runtime, vm)

    def _resize_cpus(
        self, qmp: QMPClient, spec: VMSpec, vcpus: int, hotplugged: list[dict[str, Any]]
    ) -> None:
        maximum = spec.max_vcpus or spec.vcpus
        if vcpus > maximum:
            raise NotSupported(f"vcpus {vcpus} exceeds max_vcpus {maximum} given at start")
        slots = qmp.execute("query-hotpluggable-cpus")
        present = [s for s in slots if s.get("qom-path")]
        if vcpus < len(present):
            raise NotSupported("removing vCPUs from a running QEMU guest is not supported")
        free = [s for s in slots if not s.get("qom-path")]
        for slot in free[: vcpus - len(present)]:
            dev_id = f"hcpu{slot['props'].get('socket-id', 0)}-{slot['props'].get('core-id', 0)}"
            qmp.execute("device_add", {"driver": slot["type"], "id": dev_id, **slot["props"]})
            hotplugged.append({"kind": "cpu", "id": dev_id})

    def _resize_memory(
        self, qmp: QMPClient, spec: VMSpec, memory_mib: int, hotplugged: list[dict[str, Any]]
    ) -> None:
        summary = qmp.execute("query-memory-size-summary")
        current = (summary.get("base-memory", 0) + summary.get("plugged-memory", 0)) >> 20
        maximum = spec.max_memory_mib or spec.memory_mib
        if memory_mib < current:
            raise NotSupported("shrinking the memory of a running QEMU guest is not supported")
        if memory_mib > maximum:
            raise NotSupported(f"memory_mib {memory_mib} exceeds max_memory_mib {maximum}")
        add = memory_mib - current
        if add == 0:
            return
        if add % 128:
            raise HypervisorError("memory is hot-plugged in multiples of 128 MiB")
        n = sum(1 for h in hotplugged if h["kind"] == "memory")
        mem_id, dimm_id = f"hmem{n}", f"hdimm{n}"
        qmp.execute(
            "object-add", {"qom-type": "memory-backend-ram", "id": mem_id, "size": add << 20}
        )
        qmp.execute("device_add", {"driver": "pc-dimm", "id": dimm_id, "memdev": mem_id})
        hotplugged.append({"kind": "memory", "id": dimm_id, "mib": add})

    def balloon(self, runtime: RuntimeDir, target_mib: int) -> None:
        spec = spec_from_dict(self._load_vm(runtime)["spec"])
        if not spec.balloon:
            raise NotSupported("this VM was started without a balloon device")
        if target_mib < 1:
            raise HypervisorError(f"a balloon target must be positive, not {target_mib}")
        with self._qmp(runtime) as qmp:
            qmp.execute("balloon", {"value": target_mib << 20})

    def balloon_mib(self, runtime: RuntimeDir) -> int | None:
        if not spec_from_dict(self._load_vm(runtime)["spec"]).balloon:
            return None
        with self._qmp(runtime) as qmp:
            return int(qmp.execute("query-balloon")["actual"]) >> 20

    def set_cpu_weight(self, runtime: RuntimeDir, weight: int | None) -> int:
        jailed = self._jail_record(runtime)
        if not jailed or not self.is_alive(runtime):
            raise NotSupported("this VMM is not jailed: it has no cgroup of its own")
        try:
            return jail.reweigh(self.jail, jailed["name"], weight or jailed.get("cpu_weight", 100))
        except jail.JailError as exc:
            raise HypervisorError(str(exc)) from exc

    def info(self, runtime: RuntimeDir) -> VMInfo:
        pid = runtime.pid()
        if not self.is_alive(runtime):
            return VMInfo(VMState.DEAD, None)
        with self._qmp(runtime) as qmp:
            status = qmp.execute("query-status")["status"]
            cpus = qmp.execute("query-cpus-fast")
            mem = qmp.execute("query-memory-size-summary")
        if status == "running":
            state = VMState.RUNNING
        elif status == "shutdown":
            state = VMState.SHUTDOWN
        elif status in _PAUSED_STATES:
            state = VMState.PAUSED
        else:
            state = VMState.PAUSED
        memory = (mem.get("base-memory", 0) + mem.get("plugged-memory", 0)) >> 20
        return VMInfo(
            state,
            pid,
            vcpus=len(cpus),
            memory_mib=memory,
            detail={"qemu_status": status, "accel": self._load_vm(runtime).get("accel")},
        )

    def counters(self, runtime: RuntimeDir) -> dict[str, dict[str, int]]:
        """Block counters from ``query-blockstats``; NIC counters from the tap as seen in the
        QEMU process's network namespace (QEMU 7.2 has no per-NIC QMP statistics), swapped to
        the guest's point of view (what the tap transmits, the guest receives)."""
        vm = self._load_vm(runtime)
        out: dict[str, dict[str, int]] = {}
        with self._qmp(runtime) as qmp:
            for dev in qmp.execute("query-blockstats"):
                name = dev.get("device") or dev.get("qdev", "?")
                st = dev.get("stats", {})
                out[name] = {
                    "read_bytes": st.get("rd_bytes", 0),
                    "write_bytes": st.get("wr_bytes", 0),
                    "read_ops": st.get("rd_operations", 0),
                    "write_ops": st.get("wr_operations", 0),
                    "flush_ops": st.get("flush_operations", 0),
                }
        pid = runtime.pid()
        nets = vm["spec"]["nets"]
        taps = {n["tap"]: (n.get("id") or f"net{i}") for i, n in enumerate(nets)}
        if taps and pid:
            for where in {n.get("netns", "") for n in nets}:
                for ifname, tap in _tap_stats(where, pid, set(taps)).items():
                    # What the TAP transmits, the guest receives.
                    out[taps[ifname]] = {
                        "rx_bytes": tap["tx_bytes"],
                        "rx_packets": tap["tx_packets"],
                        "tx_bytes": tap["rx_bytes"],
                        "tx_packets": tap["rx_packets"],
                        "rx_dropped": tap["tx_dropped"],
                        "tx_dropped": tap["rx_dropped"],
                    }
        return out

    def set_link(self, runtime: RuntimeDir, nic_id: str, up: bool) -> None:
        """Plug or unplug a NIC's cable: while down, the guest sees no carrier and QEMU drops
        what it sends. The state is saved with a snapshot (virtio-net status)."""
        if not _DEV_ID.match(nic_id):
            raise HypervisorError(f"invalid net id {nic_id!r}")
        with self._qmp(runtime) as qmp:
            qmp.execute("set_link", {"name": f"{nic_id}-dev", "up": up})

    def nic_macs(self, runtime: RuntimeDir) -> dict[str, str]:
        """The MAC each NIC really has now, keyed by NIC id (``query-rx-filter``): after a
        restore it is the snapshot's until the guest sets its own."""
        with self._qmp(runtime) as qmp:
            filters = qmp.execute("query-rx-filter")
        return {f["name"].removesuffix("-dev"): f["main-mac"] for f in filters}

    # -- process -----------------------------------------------------------------------------
    def is_alive(self, runtime: RuntimeDir) -> bool:
        return process.process_matches(runtime.pid(), self.exe_names, str(runtime.control_socket))

    def agent_connect(self, runtime: RuntimeDir, timeout: float) -> socket.socket:
        """Connect to the agent's virtio-serial chardev (one client at a time)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(runtime.agent_socket))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise HypervisorError(f"agent socket {runtime.agent_socket}: {exc}") from exc
                if not self.is_alive(runtime):
                    raise HypervisorError("QEMU is not running") from exc
                time.sleep(0.01)
                continue
            try:
                process.check_peer(sock, runtime.pid(), f"agent socket {runtime.agent_socket}")
            except (HypervisorError, OSError):
                sock.close()
                raise
            return sock

    def stop_hard(self, runtime: RuntimeDir, timeout: float = 5.0) -> None:
        process.terminate(runtime.pid(), self.exe_names, str(runtime.control_socket), timeout)
        runtime.pidfile.unlink(missing_ok=True)
        self._release_jail(runtime)

    def destroy(self, runtime: RuntimeDir) -> None:
        jailed = self._jail_record(runtime)
        self.stop_hard(runtime)
        shutil.rmtree(runtime.root, ignore_errors=True)
        if runtime.root.exists():
            raise HypervisorError(f"could not remove {runtime.root}")
        if jailed:
            jail.release(self.jail, runtime.root, jailed["name"])

    # -- jail ---------------------------------------------------------------------------------
    def jail_spec(self, spec: VMSpec, runtime: RuntimeDir, accel: str) -> jail.JailSpec:
        """The jail of ``spec``'s VMM (``vms.hypervisors.jail``): its files, uid and limits."""
        ro = [p for p in (spec.kernel, spec.initramfs) if p is not None]
        rw: list[Path] = []
        for disk in spec.disks:
            (ro if disk.readonly else rw).append(disk.path)
        if spec.boot == "uefi":
            ro.append(spec.firmware_code or OVMF_CODE)
            rw.append(spec.firmware_vars or runtime.root / VARS_FILE)
        if runtime.serial_log.is_file():  # QEMU appends to the log of an earlier run
            rw.append(runtime.serial_log)
        return self.jail.spec_for(
            spec.vm_id,
            runtime.root,
            runtime.pidfile,
            ro=ro,
            rw=rw,
            devices=("/dev/kvm",) if accel == "kvm" else (),
            # A TAP descriptor works from any namespace; one opened by name needs QEMU's own,
            # and its counters are read there (/proc/<pid>/net/dev).
            new_netns=all(n.fd is not None and n.netns for n in spec.nets),
            memory_mib=max(spec.max_memory_mib or 0, spec.memory_mib),
            overhead_mib=self.tb_size_mib,  # TCG's translation buffer
            vcpus=max(spec.max_vcpus or 0, spec.vcpus),
        )

    def _jail_record(self, runtime: RuntimeDir) -> dict[str, Any] | None:
        try:
            record = self._load_vm(runtime).get("jail")
        except (HypervisorError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _release_jail(self, runtime: RuntimeDir) -> None:
        """Remove the cgroups of a stopped VMM (its uid stays with the runtime directory)."""
        jailed = self._jail_record(runtime)
        if jailed and not self.is_alive(runtime):
            jail.release(self.jail, runtime.root, jailed["name"])
