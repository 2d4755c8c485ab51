"""Compare the VMM processes that exist with the VMs that should exist (no Django here).

Each VM's runtime directory is ``<runtime_root>/<vm_id>/``. ``scan()`` reports

* **dead**: a runtime directory whose pidfile names no live VMM (the VMM crashed or was killed:
  the caller appends ``vm.crashed``);
* **alive**: runtime directories with a live VMM (``vm.recovered`` where the projection thought
  otherwise);
* **orphans**: VMM processes whose command line points into ``runtime_root`` at a VM id the caller
  does not know (e.g. the event that created it was never committed), which
  ``teardown_orphans()`` kills and cleans up.

Processes are found through ``/proc`` by executable name and by the runtime path in their argv,
so this works for a VMM started by a worker that has since restarted.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import process
from .base import RuntimeDir

__all__ = [
    "DEFAULT_VMM_NAMES",
    "DeadVM",
    "OrphanVMM",
    "ReconcileReport",
    "scan",
    "teardown_orphans",
]

DEFAULT_VMM_NAMES: tuple[str, ...] = ("qemu-system-x86_64", "cloud-hypervisor")


@dataclass(frozen=True)
class DeadVM:
    vm_id: str
    runtime: RuntimeDir
    pid: int | None  # the pid the pidfile named


@dataclass(frozen=True)
class OrphanVMM:
    vm_id: str
    pid: int
    runtime: RuntimeDir
    argv: tuple[str, ...]


@dataclass
class ReconcileReport:
    alive: dict[str, int] = field(default_factory=dict)  # vm_id -> pid
    dead: list[DeadVM] = field(default_factory=list)
    orphans: list[OrphanVMM] = field(default_factory=list)


def _vm_id_from_argv(argv: Sequence[str], root: str) -> str | None:
    """The first path component after ``root/`` in any argument (sockets, pidfile, logs)."""
    prefix = root.rstrip("/") + "/"
    for arg in argv[1:]:
        idx = arg.find(prefix)
        if idx < 0:
            continue
        rest = arg[idx + len(prefix) :]
        vm_id = rest.split("/", 1)[0].split(",", 1)[0]
        if vm_id and "/" in rest:
            return vm_id
    return None


def scan(
    runtime_root: Path,
    known_ids: Iterable[str] | None = None,
    vmm_names: Sequence[str] = DEFAULT_VMM_NAMES,
) -> ReconcileReport:
    """Look at every runtime dir under ``runtime_root`` and every VMM process pointing there.

    ``known_ids``: VM ids the control plane believes exist; ``None`` means "every runtime dir
    present is known" (so only processes without a directory are orphans).
    """
    root = Path(runtime_root).resolve()
    report = ReconcileReport()
    procs: dict[str, list[process.ProcInfo]] = {}
    for info in process.iter_processes(vmm_names):
        vm_id = _vm_id_from_argv(info.argv, str(root))
        if vm_id is not None:
            procs.setdefault(vm_id, []).append(info)
    dirs = (
        {e.name: RuntimeDir(Path(e.path)) for e in os.scandir(root) if e.is_dir()}
        if root.is_dir()
        else {}
    )
    known = set(dirs) if known_ids is None else set(known_ids)
    for vm_id, runtime in sorted(dirs.items()):
        pid = runtime.pid()
        live = [p for p in procs.get(vm_id, ()) if p.pid == pid]
        if live:
            report.alive[vm_id] = live[0].pid
        elif runtime.pidfile.exists():
            report.dead.append(DeadVM(vm_id, runtime, pid))
    for vm_id, infos in sorted(procs.items()):
        if vm_id in known:
            continue
        for info in infos:
            report.orphans.append(OrphanVMM(vm_id, info.pid, RuntimeDir(root / vm_id), info.argv))
    return report


def teardown_orphans(
    orphans: Iterable[OrphanVMM], *, remove_dirs: bool = True, timeout: float = 5.0
) -> list[str]:
    """Kill each orphan VMM (SIGTERM, then SIGKILL) and remove its runtime dir; return the ids."""
    done = []
    for orphan in orphans:
        marker = str(orphan.runtime.root) + "/"
        process.terminate(orphan.pid, (os.path.basename(orphan.argv[0]),), marker, timeout)
        if remove_dirs:
            shutil.rmtree(orphan.runtime.root, ignore_errors=True)
        done.append(orphan.vm_id)
    return done
