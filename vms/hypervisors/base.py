"""The contract every VMM driver satisfies, and the value types that cross it.

Nothing outside ``vms/hypervisors/`` knows a VMM's wire format: callers build a ``VMSpec``, give
each VM a ``RuntimeDir`` and talk to the driver through the ``Hypervisor`` protocol below. Drivers
are plain Python (no Django imports) so that they can be driven from tests, benches and workers.
"""

from __future__ import annotations

import dataclasses
import enum
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

__all__ = [
    "BootMode",
    "DiskSpec",
    "HypervisorError",
    "Hypervisor",
    "NetSpec",
    "NotSupported",
    "RuntimeDir",
    "SnapshotFiles",
    "StartResult",
    "TemplateHooks",
    "TemplateStarter",
    "VMInfo",
    "VMSpec",
    "VMState",
]


class HypervisorError(RuntimeError):
    """A VMM refused or failed an operation; ``str()`` is a reason fit to show an operator."""


class NotSupported(HypervisorError):
    """The operation cannot be done with this VMM or machine type (e.g. vCPU hotplug on microvm)."""


BootMode = Literal["linux", "uefi"]


class VMState(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    DEAD = "dead"  # no VMM process


@dataclass(frozen=True)
class DiskSpec:
    path: Path
    readonly: bool = False
    format: Literal["raw", "qcow2"] = "raw"
    id: str = ""


@dataclass(frozen=True)
class NetSpec:
    """One virtio-net NIC backed by a TAP.

    ``fd``: an open descriptor of the TAP (``vms.network.tap.open_fd``) that the VMM inherits;
    the caller keeps ownership and closes it once ``start``/``restore`` returned. Without it the
    VMM opens ``tap`` by name in its own network namespace. ``netns``: the namespace the TAP lives
    in (where its counters are read). A descriptor is never persisted: a driver that records the
    spec drops it.

    ``address`` (CIDR), ``gateway`` and ``dns`` are the guest's side: VMMs ignore them; the
    guest agent applies them (``vms.agent.readiness.configure_guest``), never the kernel command
    line.
    """

    tap: str
    mac: str
    id: str = ""
    fd: int | None = None
    netns: str = ""
    address: str = ""
    gateway: str = ""
    dns: tuple[str, ...] = ()


@dataclass(frozen=True)
class VMSpec:
    """Everything a VMM needs to start one guest. Paths are absolute host paths."""

    vm_id: str
    boot: BootMode = "linux"
    vcpus: int = 1
    max_vcpus: int | None = None
    memory_mib: int = 256
    max_memory_mib: int | None = None
    kernel: Path | None = None
    initramfs: Path | None = None
    cmdline: str = ""
    firmware_code: Path | None = None  # UEFI code (OVMF_CODE.fd / CLOUDHV.fd)
    firmware_vars: Path | None = None  # per-VM writable copy of the UEFI variable store
    disks: tuple[DiskSpec, ...] = ()
    nets: tuple[NetSpec, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)
    # A virtio-balloon device, so the host can take guest memory back under pressure
    # (``Hypervisor.balloon``). A spec saved before balloons existed reads back without one,
    # so its saved state restores under the command line it was saved with.
    balloon: bool = True

    def replace(self, **changes: object) -> VMSpec:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RuntimeDir:
    """The per-VM directory holding the VMM's sockets, pidfile and log.

    Unix socket paths are limited to 107 bytes, so keep the root short.
    """

    root: Path

    @property
    def control_socket(self) -> Path:  # QMP for QEMU, the REST API for Cloud Hypervisor
        return self.root / "control.sock"

    @property
    def serial_socket(self) -> Path:
        return self.root / "console.sock"

    @property
    def serial_log(self) -> Path:
        return self.root / "console.log"

    @property
    def agent_socket(self) -> Path:
        return self.root / "agent.sock"

    @property
    def pidfile(self) -> Path:
        return self.root / "vmm.pid"

    @property
    def vmm_log(self) -> Path:
        return self.root / "vmm.log"

    def create(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None


@dataclass(frozen=True)
class VMInfo:
    state: VMState
    pid: int | None
    vcpus: int | None = None
    memory_mib: int | None = None
    detail: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class SnapshotFiles:
    """What a driver wrote for one snapshot: every file under ``directory`` it needs to restore."""

    directory: Path
    files: tuple[Path, ...]


@dataclass(frozen=True)
class StartResult:
    """How a ``TemplateStarter`` started a VM."""

    pid: int
    restored: bool  # False: cold-booted (template unusable for this spec)
    seconds: float
    reason: str = ""  # why a cold boot was used
    # What the restored guest wants from its host (its agent's credential: the template's,
    # shared by every VM restored from it until the caller gives the VM its own at once).
    guest_secret: str | None = field(default=None, repr=False)


class TemplateStarter(Protocol):
    """Starts VMs by restoring a saved template guest of the same shape (``template_cache``)."""

    def start(
        self,
        spec: VMSpec,
        runtime: RuntimeDir,
        *,
        fallback: bool = True,
        network_ready: Callable[[], None] | None = None,
    ) -> StartResult:
        """Start ``spec`` from its template (building it if needed), its clock and identity
        reset; cold-boot instead when no template can serve it and ``fallback`` is true.
        ``network_ready`` is called before the guest's links can come up (its NICs' host side
        may still be being set up while the VMM starts)."""
        ...


@dataclass(frozen=True)
class TemplateHooks:
    """What saved-state templates need from their caller, who knows the guest and its disks
    (a driver knows neither the guest agent nor how a data disk is made)."""

    # (hypervisor, runtime, timeout): returns once a freshly booted template guest is ready to
    # be saved (its agent answers, and has been warmed up), with the secret the saved guest
    # wants from its host (its agent's credential), or None. The cache keeps it beside the
    # template (a root-only file) and hands it to ``reset_identity`` and the caller.
    wait_ready: Callable[[Hypervisor, RuntimeDir, float], str | None]
    # (hypervisor, runtime, spec, secret): after a restore, sets the guest's clock and identity
    # (it has the template's) to the VM's; ``secret`` is what ``wait_ready`` returned.
    reset_identity: Callable[[Hypervisor, RuntimeDir, VMSpec, str | None], None]
    # (path, size_mib): makes an empty writable data disk at ``path``.
    make_disk: Callable[[Path, int], object]


@runtime_checkable
class Hypervisor(Protocol):
    """One VMM. Every method takes the VM's runtime directory; none blocks without a timeout."""

    name: str

    def start(self, spec: VMSpec, runtime: RuntimeDir) -> int:
        """Start the VMM in its own session and boot the guest; return the VMM pid.

        Returns once the VMM answers on its control socket, not when the guest is up
        (use ``agent_connect`` and the agent's hello for that).
        """
        ...

    def restore(self, spec: VMSpec, runtime: RuntimeDir, snapshot: SnapshotFiles) -> int:
        """Start a new VMM from a snapshot; the guest is running when this returns."""
        ...

    def snapshot_nics(self, snapshot: SnapshotFiles) -> int:
        """How many NICs the guest saved in ``snapshot`` has (a restore gives it as many)."""
        ...

    def snapshot(self, runtime: RuntimeDir, directory: Path) -> SnapshotFiles:
        """Save the guest state into ``directory`` (which must exist and be empty).

        The guest is left paused; the caller resumes or destroys it.
        """
        ...

    def pause(self, runtime: RuntimeDir) -> None: ...

    def resume(self, runtime: RuntimeDir) -> None: ...

    def power_button(self, runtime: RuntimeDir) -> None:
        """Ask the guest to shut down (ACPI power button or equivalent)."""
        ...

    def reboot(self, runtime: RuntimeDir) -> None: ...

    def resize(
        self, runtime: RuntimeDir, *, vcpus: int | None = None, memory_mib: int | None = None
    ) -> None:
        """Change vCPUs and/or memory of a running guest; ``NotSupported`` where impossible."""
        ...

    def balloon(self, runtime: RuntimeDir, target_mib: int) -> None:
        """Set the guest's memory to ``target_mib`` through its virtio-balloon (at most its
        boot memory: that gives everything back); ``NotSupported`` without a balloon device.
        The guest's driver inflates or deflates towards it at its own pace."""
        ...

    def balloon_mib(self, runtime: RuntimeDir) -> int | None:
        """The memory the guest has now, after its balloon (None: no balloon device)."""
        ...

    def set_cpu_weight(self, runtime: RuntimeDir, weight: int | None) -> int:
        """Set the CPU weight of the VM's VMM cgroup (cgroup v2 scale, 1..10000; None: the one
        it started with, from its vCPUs); returns the weight it had. ``NotSupported`` when the
        VMM is not jailed (no cgroup of its own)."""
        ...

    def info(self, runtime: RuntimeDir) -> VMInfo: ...

    def counters(self, runtime: RuntimeDir) -> dict[str, dict[str, int]]:
        """Device counters keyed by device id (block: read_bytes..., net: rx_bytes...)."""
        ...

    def is_alive(self, runtime: RuntimeDir) -> bool:
        """True while this VM's VMM process exists (checked by pid and command line)."""
        ...

    def agent_connect(self, runtime: RuntimeDir, timeout: float) -> socket.socket:
        """A connected stream to the guest agent's port (after any VMM handshake)."""
        ...

    def nic_macs(self, runtime: RuntimeDir) -> dict[str, str]:
        """The MAC each NIC has now, keyed by NIC id: after a restore, the snapshot's until the
        guest sets its own (the guest agent finds a NIC by it)."""
        ...

    def stop_hard(self, runtime: RuntimeDir, timeout: float = 5.0) -> None:
        """Kill the VMM process (SIGTERM, then SIGKILL) and wait for it to go."""
        ...

    def destroy(self, runtime: RuntimeDir) -> None:
        """Kill the VMM if alive and remove every socket and file of the runtime directory."""
        ...

    def template_cache(
        self,
        hooks: TemplateHooks,
        *,
        cache_dir: Path | None = None,
        scratch_root: Path | None = None,
        boot_timeout: float = 180.0,
    ) -> TemplateStarter | None:
        """Fast starts from saved template guests, or None when this VMM has none (the caller
        then cold-boots with ``start``).

        ``cache_dir`` keeps the templates (default ``$SANDBOX_TEMPLATE_CACHE``); a template
        guest's runtime directory goes under ``scratch_root`` (keep it short: socket paths);
        ``boot_timeout`` bounds the template's cold boot (``hooks.wait_ready``).
        """
        ...
