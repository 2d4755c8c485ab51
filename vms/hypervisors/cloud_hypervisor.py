"""The Cloud Hypervisor driver: one ``cloud-hypervisor`` process per VM, driven over its REST API.

How it maps onto Cloud Hypervisor v53 (details in ``docs/cloud-hypervisor.md``):

- ``start``: spawn ``cloud-hypervisor --api-socket path=<control.sock>`` in its own session (see
  ``process.spawn_vmm``), wait for ``vmm.ping``, then ``vm.create`` with a VmConfig built from the
  ``VMSpec`` and ``vm.boot``. Config errors surface at boot (the server validates late).
- control: ``vm.pause``/``vm.resume``/``vm.reboot``/``vm.power-button``/``vm.shutdown``/
  ``vm.delete``/``vmm.shutdown``, ``vm.info``, ``vm.counters``, ``vm.resize``.
- ``snapshot``: pause if running, ``vm.snapshot`` to ``file://<dir>``, then copy the writable disk
  images (CH does not) and write ``sandbox-snapshot.json`` beside CH's three files.
- ``restore``: a fresh VMM, a staged copy of ``config.json`` relocated to the new runtime
  directory and disks, ``vm.restore`` (the VM comes back paused), then ``vm.resume``.
- sandboxing: ``--seccomp true`` always; Landlock (``landlock_enable`` in the VmConfig, with the
  runtime directory as the one extra read-write path) where the VMM is v41 or later and the
  kernel has Landlock; and the jail of ``jail.py`` (namespaces, uid, cgroups) by default. A
  jailed VMM sees only its runtime directory and its spec's files, so it takes snapshots into
  the runtime directory, from where the driver moves them to their destination.
- the guest agent is reached through hybrid vsock: ``CONNECT <port>\\n`` on the vsock unix socket,
  answered by ``OK <host port>\\n``, after which the stream is raw.

The ``Hypervisor`` protocol in ``base.py`` has no verbs for stopping only the guest or only the
VMM; Cloud Hypervisor has both, so this class adds ``boot``, ``shutdown_vm``, ``delete_vm``,
``shutdown_vmm`` and ``ping`` beside the protocol methods.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import jail
from .base import (
    HypervisorError,
    NetSpec,
    NotSupported,
    RuntimeDir,
    SnapshotFiles,
    TemplateHooks,
    TemplateStarter,
    VMInfo,
    VMSpec,
    VMState,
)
from .chapi import ChApi, ChApiError, ChApiUnavailable
from .process import check_peer, process_matches, reap, spawn_vmm, terminate, wait_for

__all__ = [
    "AGENT_VSOCK_PORT",
    "CH_SNAPSHOT_FILES",
    "SNAPSHOT_META",
    "CloudHypervisor",
    "ResizeBusy",
    "build_vm_config",
]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
AGENT_VSOCK_PORT = 1024
SNAPSHOT_META = "sandbox-snapshot.json"
JAIL_RECORD = "jail.json"
SNAPSHOT_STAGE = "snapshot-stage"
LANDLOCK_SINCE = 41  # the release that added --landlock / landlock_enable
CH_SNAPSHOT_FILES = ("config.json", "state.json", "memory-ranges")
# Linux onlines hot-added memory in 128 MiB blocks, and CH's ACPI hotplug expects that size.
MEMORY_HOTPLUG_ALIGN_MIB = 128

_STATES = {
    "Created": VMState.CREATED,
    "Running": VMState.RUNNING,
    "Paused": VMState.PAUSED,
    "Shutdown": VMState.SHUTDOWN,
    "BreakPoint": VMState.PAUSED,  # in the Rust enum, not the spec: a debugger stop is a pause
}
_IMAGE_TYPES = {"raw": "Raw", "qcow2": "Qcow2"}


class ResizeBusy(HypervisorError):
    """``vm.resize`` answered 429: a vCPU removal is still pending in the guest; retry later."""


def build_vm_config(spec: VMSpec, runtime: RuntimeDir, *, vsock_cid: int = 3) -> dict[str, Any]:
    """The ``VmConfig`` body for ``vm.create``, as the v53 server (not only its spec) wants it.

    Everything a daemon must not leave to defaults is explicit: ``console`` would default to the
    VMM's stdout (Tty), ``serial`` to Null, disk ``image_type`` to deprecated autodetection. Net
    entries carry no ``ip``/``mask``: the spec's defaults for them are stale, and setting them
    makes CH configure the host side of the tap, which needs CAP_NET_ADMIN.
    """
    if spec.vcpus < 1:
        raise HypervisorError(f"vcpus must be at least 1, not {spec.vcpus}")
    max_vcpus = spec.max_vcpus if spec.max_vcpus is not None else spec.vcpus
    if max_vcpus < spec.vcpus:
        raise HypervisorError(f"max_vcpus ({max_vcpus}) is below vcpus ({spec.vcpus})")
    if spec.memory_mib < 1:
        raise HypervisorError(f"memory_mib must be positive, not {spec.memory_mib}")

    if spec.boot == "linux":
        if spec.kernel is None:
            raise HypervisorError("linux boot needs a kernel")
        payload: dict[str, Any] = {"kernel": str(spec.kernel)}
        if spec.initramfs is not None:
            payload["initramfs"] = str(spec.initramfs)
        if spec.cmdline:
            payload["cmdline"] = spec.cmdline
    elif spec.boot == "uefi":
        if spec.firmware_code is None:
            raise HypervisorError("uefi boot needs firmware_code (CLOUDHV.fd)")
        # CH ignores cmdline/initramfs with firmware, and has no pflash variable store, so
        # firmware_vars cannot be honoured: UEFI variables do not survive a VMM restart.
        payload = {"firmware": str(spec.firmware_code)}
        if spec.firmware_vars is not None:
            log.info("cloud-hypervisor has no UEFI variable store; ignoring %s", spec.firmware_vars)
    else:
        raise NotSupported(f"boot mode {spec.boot!r} is not supported by cloud-hypervisor")

    cpus: dict[str, Any] = {"boot_vcpus": spec.vcpus, "max_vcpus": max_vcpus}
    hyperv = spec.extra.get("ch.kvm_hyperv", "on" if spec.boot == "uefi" else "off")
    if hyperv not in ("on", "off"):
        raise HypervisorError(f"ch.kvm_hyperv must be on or off, not {hyperv!r}")
    if hyperv == "on":
        cpus["kvm_hyperv"] = True  # Windows guests need the Hyper-V enlightenments

    memory: dict[str, Any] = {"size": spec.memory_mib * MiB}
    if spec.max_memory_mib is not None and spec.max_memory_mib != spec.memory_mib:
        if spec.max_memory_mib < spec.memory_mib:
            raise HypervisorError(
                f"max_memory_mib ({spec.max_memory_mib}) is below memory_mib ({spec.memory_mib})"
            )
        memory["hotplug_size"] = (spec.max_memory_mib - spec.memory_mib) * MiB
        memory["hotplug_method"] = "Acpi"

    disks = []
    for index, disk in enumerate(spec.disks):
        entry: dict[str, Any] = {
            "path": str(disk.path),
            "readonly": disk.readonly,
            "image_type": _IMAGE_TYPES[disk.format],
            "id": disk.id or f"disk{index}",
        }
        if disk.format == "qcow2":
            # Per-VM overlays over a shared base image are qcow2 files with a backing file,
            # which CH refuses to open unless told to follow it.
            entry["backing_files"] = True
        disks.append(entry)

    # NICs backed by a TAP descriptor are not in vm.create (it takes no descriptors): start()
    # cold-adds them with vm.add-net before vm.boot (see net_config).
    nets = [net_config(net, index) for index, net in enumerate(spec.nets) if net.fd is None]

    config: dict[str, Any] = {
        "payload": payload,
        "cpus": cpus,
        "memory": memory,
        "serial": {"mode": "Socket", "socket": str(runtime.serial_socket)},
        "console": {"mode": "Off"},
        "vsock": {"cid": vsock_cid, "socket": str(runtime.agent_socket), "id": "vsock0"},
        "rng": {"src": "/dev/urandom"},
    }
    if spec.balloon:
        # Empty at boot; vm.resize's desired_balloon inflates it under host pressure
        # (vms.pressure). No deflate_on_oom: what the host took, the guest does not take back.
        config["balloon"] = {"size": 0, "deflate_on_oom": False, "free_page_reporting": False}
    if disks:
        config["disks"] = disks
    if nets:
        config["net"] = nets
    return config


def net_config(net: NetSpec, index: int) -> dict[str, Any]:
    """The ``NetConfig`` of one NIC: the TAP by name, or, when the spec holds its descriptor,
    no name at all (the descriptor goes with the ``vm.add-net`` request as SCM_RIGHTS; one
    descriptor is one queue pair, which is CH's default of two queues). Never ``ip``/``mask``
    (host-side set-up, stale defaults: see ``build_vm_config``)."""
    config: dict[str, Any] = {"mac": net.mac.lower(), "id": net.id or f"net{index}"}
    if net.fd is None:
        config = {"tap": net.tap, **config}
    return config


def _relocate_config(config: dict[str, Any], spec: VMSpec, runtime: RuntimeDir) -> dict[str, Any]:
    """A snapshot's ``config.json`` pointed at a new runtime directory, disks and taps.

    CH restores every path from config.json; the snapshot was taken in another runtime directory
    and possibly for disks that belong to another VM, so those paths are rewritten.
    """
    out = json.loads(json.dumps(config))  # deep copy of plain JSON
    disks = out.get("disks") or []
    if len(disks) != len(spec.disks):
        raise HypervisorError(
            f"the snapshot has {len(disks)} disk(s) but the spec gives {len(spec.disks)}"
        )
    for entry, disk in zip(disks, spec.disks, strict=True):
        entry["path"] = str(disk.path)
    nets = out.get("net") or []
    if len(nets) != len(spec.nets):
        raise HypervisorError(
            f"the snapshot has {len(nets)} network device(s) but the spec gives {len(spec.nets)}"
        )
    for entry, net in zip(nets, spec.nets, strict=True):
        entry["tap"] = net.tap
        entry["mac"] = net.mac
    if out.get("vsock"):
        out["vsock"]["socket"] = str(runtime.agent_socket)
    out["serial"] = {"mode": "Socket", "socket": str(runtime.serial_socket)}
    out["console"] = {"mode": "Off"}
    return out


def _copy_sparse(src: Path, dst: Path, chunk: int = 1 << 20) -> None:
    """Copy ``src`` to ``dst`` keeping holes (disk images are mostly holes), atomically."""
    tmp = dst.with_name(dst.name + ".part")
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        fd_in, fd_out = fin.fileno(), fout.fileno()
        size = os.fstat(fd_in).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd_in, pos, os.SEEK_DATA)
                end = os.lseek(fd_in, start, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                start, end = pos, size  # no SEEK_DATA on this filesystem: copy everything
            while start < end:
                data = os.pread(fd_in, min(chunk, end - start), start)
                if not data:
                    break
                os.pwrite(fd_out, data, start)
                start += len(data)
            pos = end
        fout.truncate(size)
        os.fsync(fd_out)
    tmp.replace(dst)


def _disk_in_use(path: Path) -> bool:
    """True if another process holds a lock on the image, as CH does on every disk it opens.

    CH takes OFD locks; a POSIX write-lock probe conflicts with them (and with other VMMs'
    POSIX locks), so overwriting a live VM's disk is refused instead of silently done.
    """
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)  # also drops the probe's lock
    return False


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        _copy_sparse(src, dst)


def _write_record(path: Path, record: dict[str, Any] | None) -> None:
    """The jail a VMM runs in, for later calls; root's, under a fresh name (O_EXCL): a jailed
    VMM may write in its runtime directory, but can neither plant nor change this file."""
    if record is None:
        path.unlink(missing_ok=True)
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".jail.")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        if path.is_symlink() or path.stat().st_uid != os.geteuid():
            return None  # not the driver's own file
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _recv_line(sock: socket.socket, limit: int = 64) -> bytes:
    """One ``\\n``-terminated line, read byte by byte so no payload byte after it is consumed."""
    line = bytearray()
    while len(line) < limit:
        byte = sock.recv(1)
        if not byte:
            raise ConnectionResetError("closed by the VMM before the handshake finished")
        line += byte
        if byte == b"\n":
            return bytes(line)
    raise ConnectionError(f"handshake reply longer than {limit} bytes: {bytes(line)!r}")


def _log_tail(path: Path, size: int = 2000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - size))
            return fh.read().decode(errors="replace").strip()
    except OSError:
        return ""


class CloudHypervisor:
    """The ``Hypervisor`` protocol over Cloud Hypervisor's REST API."""

    name = "cloud-hypervisor"

    def __init__(
        self,
        binary: str | os.PathLike[str] = "cloud-hypervisor",
        *,
        api_timeout: float = 10.0,
        slow_timeout: float = 120.0,
        start_timeout: float = 10.0,
        agent_port: int = AGENT_VSOCK_PORT,
        vsock_cid: int = 3,
        extra_args: Sequence[str] = (),
        seccomp: str = "true",
        landlock: bool | None = None,
        jail_config: jail.JailConfig | None = None,
    ) -> None:
        if seccomp not in ("true", "log", "errno", "false"):
            raise HypervisorError(f"--seccomp must be true, log, errno or false, not {seccomp!r}")
        self.binary = str(binary)
        self.api_timeout = api_timeout
        self.slow_timeout = slow_timeout
        self.start_timeout = start_timeout
        self.agent_port = agent_port
        self.vsock_cid = vsock_cid
        self.extra_args = tuple(extra_args)
        self.seccomp = seccomp
        self.landlock = landlock  # None: wherever the VMM's version and the kernel have it
        self.jail = jail_config if jail_config is not None else jail.JailConfig.from_env()

    # ----------------------------------------------------------------- process handling

    def _resolve_binary(self) -> str:
        found = shutil.which(self.binary)
        if found is None:
            raise HypervisorError(f"cloud-hypervisor binary {self.binary!r} not found")
        return found

    def _exe_names(self) -> tuple[str, ...]:
        # argv[0] is the path we exec'd; it may have been found on PATH under another name.
        names = {Path(self.binary).name}
        found = shutil.which(self.binary)
        if found:
            names.add(Path(found).name)
        return tuple(sorted(names))

    @staticmethod
    def _marker(runtime: RuntimeDir) -> str:
        return f"path={runtime.control_socket}"

    def _api(self, runtime: RuntimeDir) -> ChApi:
        # Only the VMM's own socket: never one a (jailed) VMM linked in its place.
        return ChApi(
            runtime.control_socket,
            timeout=self.api_timeout,
            slow_timeout=self.slow_timeout,
            peer_pid=runtime.pid(),
        )

    def _live_api(self, runtime: RuntimeDir) -> ChApi:
        if not self.is_alive(runtime):
            raise HypervisorError(f"no cloud-hypervisor process for {runtime.root}")
        return self._api(runtime)

    def _remove_stale_sockets(self, runtime: RuntimeDir) -> None:
        # CH binds the vsock and serial sockets afresh; after a SIGKILL the old files are still
        # there and the bind (hence create, boot or restore) would fail.
        for path in (runtime.agent_socket, runtime.serial_socket, runtime.control_socket):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _launch(self, runtime: RuntimeDir, spec: VMSpec) -> int:
        """Spawn a bare VMM (jailed for ``spec``) and wait until its API answers; return its pid."""
        runtime.create()
        if self.is_alive(runtime):
            raise HypervisorError(
                f"a cloud-hypervisor process (pid {runtime.pid()}) already runs for {runtime.root}"
            )
        self._remove_stale_sockets(runtime)
        argv = [
            self._resolve_binary(),
            "--api-socket",
            self._marker(runtime),
            "--seccomp",
            self.seccomp,
            *self.extra_args,
        ]
        launcher: list[str] = []
        record: dict[str, Any] | None = None
        if self.jail.enabled:
            try:
                self.jail.check()
                jail_spec = self.jail_spec(spec, runtime)
            except (jail.JailError, OSError) as exc:
                raise HypervisorError(f"cannot jail cloud-hypervisor: {exc}") from exc
            launcher = [*jail.launcher_argv(jail_spec), "--"]
            record = {
                "name": jail_spec.name,
                "uid": jail_spec.uid,
                "gid": jail_spec.gid,
                "cpu_weight": jail_spec.cpu_weight,
            }
        else:
            log.warning("%s (VM %s)", jail.OFF_WARNING, spec.vm_id)
        _write_record(runtime.root / JAIL_RECORD, record)
        pid = spawn_vmm(argv, runtime, launcher=launcher)
        api = ChApi(runtime.control_socket, timeout=min(1.0, self.api_timeout), peer_pid=pid)
        deadline = time.monotonic() + self.start_timeout
        while True:
            # Our own child: its exit status is the proof (its cmdline may still be a wrapper's).
            # A jailed VMM is not our child (the launcher forked it): it is alive while it
            # answers or its process is there.
            code = reap(pid) if not launcher else (None if self.is_alive(runtime) else -1)
            if code is not None:
                tail = _log_tail(runtime.vmm_log)
                raise HypervisorError(
                    f"cloud-hypervisor exited during start-up (status {code}): {tail}"
                )
            try:
                api.ping()
                return pid
            except ChApiUnavailable:
                if time.monotonic() >= deadline:
                    self._kill(runtime)
                    raise HypervisorError(
                        f"cloud-hypervisor API did not answer within {self.start_timeout:g}s"
                    ) from None
                time.sleep(0.02)

    def _kill(self, runtime: RuntimeDir, timeout: float = 5.0) -> None:
        terminate(runtime.pid(), self._exe_names(), self._marker(runtime), timeout)

    def _fail(self, runtime: RuntimeDir, exc: HypervisorError) -> HypervisorError:
        """Tear down a half-started VMM and return the error to raise, with its log tail."""
        with contextlib.suppress(HypervisorError):
            self.stop_hard(runtime)
        tail = _log_tail(runtime.vmm_log, 600)
        if tail and not isinstance(exc, ChApiError):
            return type(exc)(f"{exc} (vmm.log: {tail})")
        return exc

    # ------------------------------------------------------------------ the protocol

    def start(self, spec: VMSpec, runtime: RuntimeDir) -> int:
        config = build_vm_config(spec, runtime, vsock_cid=self.vsock_cid)
        pid = self._launch(runtime, spec)
        api = self._api(runtime)
        try:
            api.call("vm.create", self._sandboxed(config, runtime, api))
            for index, net in enumerate(spec.nets):
                if net.fd is not None:
                    api.call("vm.add-net", net_config(net, index), fds=(net.fd,))
            api.call("vm.boot")
        except HypervisorError as exc:
            raise self._fail(runtime, exc) from exc
        return pid

    def snapshot_nics(self, snapshot: SnapshotFiles) -> int:
        directory = Path(snapshot.directory)
        self._read_snapshot_meta(directory)
        try:
            saved = json.loads((directory / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise HypervisorError(f"snapshot {directory}: unreadable config.json: {exc}") from exc
        return len(saved.get("net") or ())

    def restore(self, spec: VMSpec, runtime: RuntimeDir, snapshot: SnapshotFiles) -> int:
        if any(net.fd is not None for net in spec.nets):
            # CH takes new TAP descriptors for a restore only in RestoreConfig.net_fds, which
            # the v53 API document does not have: by name, CH would open the TAP in its own
            # namespace, which is not where the product's TAPs live.
            raise NotSupported(
                "cloud-hypervisor cannot restore a VM whose NICs are TAP descriptors "
                "(RestoreConfig has no net_fds in its v53 API): cold boot instead"
            )
        directory = Path(snapshot.directory)
        meta = self._read_snapshot_meta(directory)
        missing = [str(p) for p in snapshot.files if not Path(p).is_file()]
        missing += [n for n in CH_SNAPSHOT_FILES if not (directory / n).is_file()]
        if missing:
            raise HypervisorError(f"snapshot {directory} is incomplete: missing {missing}")
        try:
            saved = json.loads((directory / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise HypervisorError(f"snapshot {directory}: unreadable config.json: {exc}") from exc
        config = _relocate_config(saved, spec, runtime)
        for key in ("landlock_enable", "landlock_rules"):  # decided afresh below
            config.pop(key, None)

        runtime.create()
        if self.is_alive(runtime):
            raise HypervisorError(f"a cloud-hypervisor process already runs for {runtime.root}")
        stage = runtime.root / "restore"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(mode=0o700)
        try:
            for name in CH_SNAPSHOT_FILES[1:]:
                _link_or_copy(directory / name, stage / name)
            self._restore_disks(directory, meta, spec)
            self._launch(runtime, spec)
            api = self._api(runtime)
            (stage / "config.json").write_text(
                json.dumps(self._sandboxed(config, runtime, api), indent=2)
            )
            record = _read_record(runtime.root / JAIL_RECORD)
            if record:
                # The jailed VMM reads the staged files as its group (the links share the
                # snapshot's inodes: their group follows the VM restored last).
                for path in (stage, *stage.iterdir()):
                    os.chown(path, 0, record["gid"])
                    os.chmod(path, 0o750 if path.is_dir() else 0o640)
            try:
                # Copy mode: guest RAM is read in during the call, so the staged files can go
                # afterwards. No "resume": the explicit vm.resume below is checked by its reply.
                api.call("vm.restore", {"source_url": f"file://{stage}", "prefault": False})
                api.call("vm.resume")
            except HypervisorError as exc:
                raise self._fail(runtime, exc) from exc
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        pid = runtime.pid()
        assert pid is not None
        return pid

    def _read_snapshot_meta(self, directory: Path) -> dict[str, Any]:
        try:
            meta = json.loads((directory / SNAPSHOT_META).read_text())
        except FileNotFoundError:
            raise HypervisorError(
                f"{directory} has no {SNAPSHOT_META}: not a snapshot taken by this driver"
            ) from None
        except (OSError, ValueError) as exc:
            raise HypervisorError(f"{directory}/{SNAPSHOT_META} is unreadable: {exc}") from exc
        if meta.get("vmm") != self.name:
            raise HypervisorError(f"{directory} holds a {meta.get('vmm')!r} snapshot")
        return dict(meta)

    @staticmethod
    def _restore_disks(directory: Path, meta: dict[str, Any], spec: VMSpec) -> None:
        saved = meta.get("disks") or []
        if len(saved) != len(spec.disks):
            raise HypervisorError(
                f"the snapshot has {len(saved)} disk(s) but the spec gives {len(spec.disks)}"
            )
        for entry, disk in zip(saved, spec.disks, strict=True):
            if entry.get("copy"):
                if _disk_in_use(disk.path):
                    raise HypervisorError(
                        f"disk {disk.path} is in use by another VMM: restore onto a disk of"
                        " its own, or stop the VM that holds it"
                    )
                # The disk must be exactly as it was at snapshot time, or the restored guest's
                # page cache and filesystem disagree: put the saved copy in place.
                disk.path.parent.mkdir(parents=True, exist_ok=True)
                _copy_sparse(directory / entry["copy"], disk.path)
            elif not disk.path.is_file():
                raise HypervisorError(f"read-only disk {disk.path} for the restore is missing")

    def snapshot(self, runtime: RuntimeDir, directory: Path) -> SnapshotFiles:
        directory = Path(directory).absolute()
        if not directory.is_dir():
            raise HypervisorError(
                f"snapshot directory {directory} does not exist (it must exist and be empty)"
            )
        if any(directory.iterdir()):
            raise HypervisorError(f"snapshot directory {directory} is not empty")
        api = self._live_api(runtime)
        info = api.info()
        state = info.get("state")
        paused_here = False
        if state == "Running":
            api.call("vm.pause")
            paused_here = True
        elif state != "Paused":
            raise HypervisorError(f"cannot snapshot a VM that is {state}")
        record = _read_record(runtime.root / JAIL_RECORD)
        try:
            if record:
                self._snapshot_jailed(api, runtime, directory, record)
            else:
                # CH strips "file://" and uses the rest verbatim: no percent-encoding.
                api.call("vm.snapshot", {"destination_url": f"file://{directory}"})
            disks = self._copy_disks(directory, info.get("config", {}).get("disks") or [])
        except HypervisorError:
            if paused_here:
                with contextlib.suppress(HypervisorError):
                    api.call("vm.resume")
            raise
        config = info.get("config", {})
        meta = {
            "format": 1,
            "vmm": self.name,
            "vmm_version": self._version(api),
            "taken_at": time.time(),
            "ch_files": list(CH_SNAPSHOT_FILES),
            "cpus": config.get("cpus"),
            "memory": config.get("memory"),
            "disks": disks,
            "nets": [{"tap": n.get("tap"), "mac": n.get("mac")} for n in config.get("net") or []],
        }
        (directory / SNAPSHOT_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        files = tuple(sorted(p for p in directory.iterdir() if p.is_file()))
        return SnapshotFiles(directory=directory, files=files)

    @staticmethod
    def _snapshot_jailed(
        api: ChApi, runtime: RuntimeDir, directory: Path, record: dict[str, Any]
    ) -> None:
        """A jailed VMM cannot see ``directory``: it writes into its runtime directory, and the
        files are moved (renamed where the filesystem allows) to ``directory``, made root's."""
        stage = runtime.root / SNAPSHOT_STAGE
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(mode=0o700)
        os.chown(stage, record["uid"], record["gid"])
        try:
            api.call("vm.snapshot", {"destination_url": f"file://{stage}"})
            for path in stage.iterdir():
                if path.is_symlink() or not path.is_file():
                    raise HypervisorError(f"unexpected {path.name} in the VMM's snapshot")
                target = directory / path.name
                shutil.move(path, target)
                os.chown(target, 0, 0)
                os.chmod(target, 0o600)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _sandboxed(self, config: dict[str, Any], runtime: RuntimeDir, api: ChApi) -> dict[str, Any]:
        """``config`` with Landlock on where the VMM and the kernel have it (``self.landlock``
        None), or as forced. CH adds the config's own paths to the ruleset; the runtime directory
        is the one more path it needs later (snapshot and restore staging)."""
        wanted = self.landlock
        if wanted is None:
            version = self._version(api) or ""
            try:
                major = int(version.lstrip("v").split(".")[0])
            except ValueError:
                major = 0
            wanted = major >= LANDLOCK_SINCE and jail.landlock_abi() > 0
        if not wanted:
            return config
        return {
            **config,
            "landlock_enable": True,
            "landlock_rules": [{"path": str(runtime.root), "access": "rw"}],
        }

    def jail_spec(self, spec: VMSpec, runtime: RuntimeDir) -> jail.JailSpec:
        """The jail of ``spec``'s VMM: its spec's files, KVM, its uid and limits."""
        ro = [p for p in (spec.kernel, spec.initramfs, spec.firmware_code) if p is not None]
        rw: list[Path] = []
        for disk in spec.disks:
            (ro if disk.readonly else rw).append(disk.path)
        by_name = any(net.fd is None for net in spec.nets)
        return self.jail.spec_for(
            spec.vm_id,
            runtime.root,
            runtime.pidfile,
            ro=ro,
            rw=rw,
            devices=("/dev/kvm", *(("/dev/net/tun",) if by_name else ())),
            # A TAP by name is opened in the VMM's namespace: only then does it keep the host's.
            new_netns=all(net.fd is not None and net.netns for net in spec.nets),
            memory_mib=max(spec.max_memory_mib or 0, spec.memory_mib),
            vcpus=max(spec.max_vcpus or 0, spec.vcpus),
        )

    def _release_jail(self, runtime: RuntimeDir) -> None:
        record = _read_record(runtime.root / JAIL_RECORD)
        if record and not self.is_alive(runtime):
            jail.release(self.jail, runtime.root, record["name"])

    @staticmethod
    def _version(api: ChApi) -> str | None:
        try:
            return str(api.ping().get("version"))
        except HypervisorError:
            return None

    @staticmethod
    def _copy_disks(directory: Path, disks: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Copy every writable disk image into the snapshot (CH only saves RAM and device state)."""
        out: list[dict[str, Any]] = []
        for index, disk in enumerate(disks):
            path = Path(disk["path"])
            entry: dict[str, Any] = {
                "id": disk.get("id"),
                "path": str(path),
                "readonly": bool(disk.get("readonly", False)),
                "image_type": disk.get("image_type"),
                "copy": None,
            }
            if not entry["readonly"]:
                copy_name = f"disk{index}-{path.name}"
                try:
                    _copy_sparse(path, directory / copy_name)
                except OSError as exc:
                    raise HypervisorError(
                        f"cannot copy disk {path} into the snapshot: {exc}"
                    ) from exc
                entry["copy"] = copy_name
            out.append(entry)
        return out

    def pause(self, runtime: RuntimeDir) -> None:
        self._live_api(runtime).action("vm.pause")

    def resume(self, runtime: RuntimeDir) -> None:
        self._live_api(runtime).action("vm.resume")

    def power_button(self, runtime: RuntimeDir) -> None:
        # Only an ACPI event: the guest decides. If it powers off, CH exits (no --no-shutdown).
        self._live_api(runtime).action("vm.power-button")

    def reboot(self, runtime: RuntimeDir) -> None:
        self._live_api(runtime).action("vm.reboot")

    def resize(
        self, runtime: RuntimeDir, *, vcpus: int | None = None, memory_mib: int | None = None
    ) -> None:
        if vcpus is None and memory_mib is None:
            raise HypervisorError("resize needs vcpus or memory_mib")
        api = self._live_api(runtime)
        info = api.info()
        config = info.get("config", {})
        body: dict[str, int] = {}
        if vcpus is not None:
            cpus = config.get("cpus", {})
            current, most = int(cpus.get("boot_vcpus", 1)), int(cpus.get("max_vcpus", 1))
            if vcpus < 1:
                raise HypervisorError(f"vcpus must be at least 1, not {vcpus}")
            if vcpus > most:
                raise NotSupported(
                    f"this VM can have at most {most} vCPU(s): it was started with"
                    f" max_vcpus={most}; hot-adding needs max_vcpus above the boot count"
                )
            if vcpus != current:
                body["desired_vcpus"] = vcpus
        if memory_mib is not None:
            body.update(self._memory_resize(info, memory_mib))
        if not body:
            return
        try:
            api.call("vm.resize", body)
        except ChApiError as exc:
            if exc.status == 429:
                raise ResizeBusy(
                    "vm.resize refused (HTTP 429): a vCPU removal is still pending in the guest;"
                    " retry once the guest has offlined the vCPUs"
                ) from exc
            raise

    @staticmethod
    def _memory_resize(info: dict[str, Any], memory_mib: int) -> dict[str, int]:
        memory = info.get("config", {}).get("memory", {})
        hotplug = int(memory.get("hotplug_size") or 0)
        if hotplug <= 0:
            raise NotSupported(
                "this VM was started without max_memory_mib, so it has no memory hotplug region"
            )
        if memory.get("zones"):
            raise NotSupported("memory zones are in use: resize-zone is needed, not resize")
        base = int(memory["size"])
        current = int(
            info.get("memory_actual_size") or base + int(memory.get("hotplugged_size") or 0)
        )
        target = memory_mib * MiB
        if target > base + hotplug:
            raise NotSupported(
                f"this VM can have at most {(base + hotplug) // MiB} MiB (max_memory_mib)"
            )
        if target == current:
            return {}
        if target < current and memory.get("hotplug_method", "Acpi") == "Acpi":
            raise NotSupported(
                "ACPI memory hotplug only grows a running guest; shrinking needs a reboot"
            )
        if (target - current) % (MEMORY_HOTPLUG_ALIGN_MIB * MiB):
            raise HypervisorError(
                f"memory can only grow in multiples of {MEMORY_HOTPLUG_ALIGN_MIB} MiB"
                f" (from {current // MiB} MiB)"
            )
        return {"desired_ram": target}

    @staticmethod
    def _balloon_state(info: dict[str, Any]) -> tuple[int, int] | None:
        """(the guest's memory in bytes without its balloon, the balloon's size) or None."""
        config = info.get("config", {})
        balloon = config.get("balloon")
        if not balloon:
            return None
        memory = config.get("memory", {})
        actual = int(
            info.get("memory_actual_size")
            or int(memory.get("size", 0)) + int(memory.get("hotplugged_size") or 0)
        )
        return actual, int(balloon.get("size") or 0)

    def balloon(self, runtime: RuntimeDir, target_mib: int) -> None:
        if target_mib < 1:
            raise HypervisorError(f"a balloon target must be positive, not {target_mib}")
        api = self._live_api(runtime)
        state = self._balloon_state(api.info())
        if state is None:
            raise NotSupported("this VM was started without a balloon device")
        actual, _ = state
        api.call("vm.resize", {"desired_balloon": max(0, actual - target_mib * MiB)})

    def balloon_mib(self, runtime: RuntimeDir) -> int | None:
        state = self._balloon_state(self._live_api(runtime).info())
        if state is None:
            return None
        actual, size = state
        return max(0, actual - size) // MiB

    def set_cpu_weight(self, runtime: RuntimeDir, weight: int | None) -> int:
        record = _read_record(runtime.root / JAIL_RECORD)
        if not record or not self.is_alive(runtime):
            raise NotSupported("this VMM is not jailed: it has no cgroup of its own")
        try:
            return jail.reweigh(self.jail, record["name"], weight or record.get("cpu_weight", 100))
        except jail.JailError as exc:
            raise HypervisorError(str(exc)) from exc

    def info(self, runtime: RuntimeDir) -> VMInfo:
        pid = runtime.pid()
        if not self.is_alive(runtime):
            return VMInfo(state=VMState.DEAD, pid=None)
        try:
            data = self._api(runtime).info()
        except ChApiError as exc:
            if exc.status == 404:  # a live VMM without a VM (deleted, or never created)
                return VMInfo(state=VMState.SHUTDOWN, pid=pid, detail={"vm": "not created"})
            raise
        except ChApiUnavailable:
            if not self.is_alive(runtime):
                return VMInfo(state=VMState.DEAD, pid=None)
            raise
        ch_state = str(data.get("state"))
        config = data.get("config") or {}
        cpus = config.get("cpus") or {}
        memory = config.get("memory") or {}
        actual = data.get("memory_actual_size")
        if not isinstance(actual, int):
            actual = int(memory.get("size", 0)) + int(memory.get("hotplugged_size") or 0)
        return VMInfo(
            state=_STATES.get(ch_state, VMState.CREATED),
            pid=pid,
            vcpus=cpus.get("boot_vcpus"),
            memory_mib=actual // MiB if actual else None,
            detail={
                "ch_state": ch_state,
                "max_vcpus": cpus.get("max_vcpus"),
                "memory_actual_size": actual,
                "hotplug_size": memory.get("hotplug_size"),
                "devices": sorted((data.get("device_tree") or {}).keys()),
            },
        )

    def counters(self, runtime: RuntimeDir) -> dict[str, dict[str, int]]:
        raw = self._live_api(runtime).counters()
        return {
            str(device): {str(k): int(v) for k, v in values.items() if isinstance(v, int)}
            for device, values in raw.items()
            if isinstance(values, dict)
        }

    def is_alive(self, runtime: RuntimeDir) -> bool:
        return process_matches(runtime.pid(), self._exe_names(), self._marker(runtime))

    def agent_connect(self, runtime: RuntimeDir, timeout: float) -> socket.socket:
        """Hybrid vsock: ``CONNECT <port>``, then ``OK <host port>`` and a raw stream.

        With no listener in the guest (still booting, agent restarting) CH just closes the
        connection, so that is retried with backoff until ``timeout``.
        """
        deadline = time.monotonic() + timeout
        delay = 0.02
        last = "no attempt"
        request = f"CONNECT {self.agent_port}\n".encode()
        while True:
            if not self.is_alive(runtime):
                raise HypervisorError(f"no cloud-hypervisor process for {runtime.root}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HypervisorError(
                    f"guest agent not reachable on vsock port {self.agent_port}"
                    f" within {timeout:g}s: {last}"
                )
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            # CH drops a handshake after 2 s; waiting longer on one attempt gains nothing.
            sock.settimeout(min(remaining, 3.0))
            try:
                sock.connect(str(runtime.agent_socket))
                check_peer(sock, runtime.pid(), f"agent socket {runtime.agent_socket}")
                sock.sendall(request)
                reply = _recv_line(sock).decode("ascii", errors="replace").strip()
                parts = reply.split()
                if len(parts) == 2 and parts[0] == "OK" and parts[1].isdigit():
                    # The number is CH's host-side port, not the guest's. The stream is handed
                    # over blocking, like QEMU's: the agent client keeps its own deadlines.
                    sock.settimeout(None)
                    return sock
                last = f"unexpected handshake reply {reply!r}"
            except (OSError, UnicodeError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            except HypervisorError:
                sock.close()  # not the VMM's socket: nothing to retry
                raise
            sock.close()
            time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)

    def stop_hard(self, runtime: RuntimeDir, timeout: float = 5.0) -> None:
        self._kill(runtime, timeout)
        self._remove_stale_sockets(runtime)
        with contextlib.suppress(FileNotFoundError):
            runtime.pidfile.unlink()
        self._release_jail(runtime)

    def destroy(self, runtime: RuntimeDir) -> None:
        record = _read_record(runtime.root / JAIL_RECORD)
        self.stop_hard(runtime)
        try:
            shutil.rmtree(runtime.root)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise HypervisorError(f"cannot remove runtime directory {runtime.root}: {exc}") from exc
        if record:
            jail.release(self.jail, runtime.root, record["name"])

    def template_cache(
        self,
        hooks: TemplateHooks,
        *,
        cache_dir: Path | None = None,
        scratch_root: Path | None = None,
        boot_timeout: float = 180.0,
    ) -> TemplateStarter | None:
        """None: this driver offers no saved-state templates; its guests cold-boot (with KVM,
        the boot that templates save under QEMU's TCG is short)."""
        return None

    # ---------------------------------------------- Cloud Hypervisor verbs beyond the protocol

    def ping(self, runtime: RuntimeDir) -> dict[str, Any]:
        """``vmm.ping``: build and version of the VMM (says nothing about the guest)."""
        return self._live_api(runtime).ping()

    def nic_macs(self, runtime: RuntimeDir) -> dict[str, str]:
        """The MACs of the VM's NICs as configured (``vm.info``), keyed by NIC id."""
        config = self._live_api(runtime).info().get("config") or {}
        return {str(n.get("id")): str(n.get("mac", "")).lower() for n in config.get("net") or []}

    def boot(self, runtime: RuntimeDir) -> None:
        """``vm.boot``: boot again a VM that was shut down with ``shutdown_vm``."""
        self._live_api(runtime).action("vm.boot")

    def shutdown_vm(self, runtime: RuntimeDir) -> None:
        """``vm.shutdown``: stop the guest at once (no ACPI), keep the VMM and the config."""
        self._live_api(runtime).action("vm.shutdown")

    def delete_vm(self, runtime: RuntimeDir) -> None:
        """``vm.delete``: stop the guest if running and drop its config; the VMM stays."""
        self._live_api(runtime).action("vm.delete")

    def shutdown_vmm(self, runtime: RuntimeDir, timeout: float = 10.0) -> None:
        """``vmm.shutdown``: the VMM deletes the VM and exits; wait for it, then tidy up."""
        self._live_api(runtime).action("vmm.shutdown")
        if not wait_for(lambda: not self.is_alive(runtime), timeout):
            raise HypervisorError(f"cloud-hypervisor did not exit within {timeout:g}s")
        self.stop_hard(runtime)  # nothing left to kill; removes sockets and the pidfile
