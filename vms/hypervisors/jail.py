"""Jailed VMMs: each VMM process in namespaces of its own, as an unprivileged user, in cgroups.

The VMM is the process that touches untrusted guest memory, so it gets as little of the host as
it can work with, after the design of Firecracker's jailer (``docs/jailer.md`` there):

* its own mount, PID and IPC namespaces, and a network namespace of its own where every NIC is a
  TAP descriptor opened elsewhere (the VMM only uses the descriptor);
* a root of its own (a small read-only tmpfs, ``pivot_root``) holding read-only binds of the
  system directories the VMM's binary needs (``/usr``, the merged-usr links, the loader's cache),
  a few device nodes, a ``/proc`` of its PID namespace, the files of its spec (kernel, images:
  read-only; writable disks: read-write) at their host paths, and its runtime directory: the only
  writable directory it has. Nothing else of the host (``/etc``, ``/root``, another VM's runtime
  directory) exists in there;
* an unprivileged uid/gid of its own (``uid_base + slot``, one slot per runtime directory, kept
  in ``<state_dir>/uids``), no supplementary groups, ``no_new_privs``;
* rlimits (``NOFILE``, ``NPROC``, ``CORE=0``, ``FSIZE``) and cgroup limits (memory with a margin
  over guest RAM, CPU weight from the vCPUs, pids) from the VM's spec, on cgroup v2 or v1;
* the environment reduced to ``PATH`` (the control plane's own never reaches the VMM).

The launcher is this very file run as a program (``python -I jail.py SPEC -- argv...``) by root:
it joins the cgroups, chowns the writable paths, unshares, forks the VMM (PID 1 of its
namespace), and exits once the VMM has exec'd, after writing the VMM's host pid to the pidfile.
The VMM is then a daemon like any other (its session of its own, reparented to init), and the
pid a caller sees is the host's view of it (``/proc/<pid>`` gives its CPU and memory).
Python 3.11 has no ``os.unshare``: ``unshare``, ``mount``, ``umount2``, ``pivot_root`` and
``prctl`` are called through libc (ctypes), never through a shell.

Stdlib only and free of the package's imports, so that it runs by path before anything else.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import fcntl
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

__all__ = [
    "JailConfig",
    "JailError",
    "JailSpec",
    "Cgroups",
    "allocate_uid",
    "launcher_argv",
    "release",
    "reweigh",
]

JailMode = Literal["auto", "on", "off"]

# System paths bound read-only into every jail (those that exist; merged-usr links are recreated
# as links). /etc is not: only the loader's cache from it.
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/bin", "/sbin")
SYSTEM_FILES = ("/etc/ld.so.cache",)
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
JAIL_PATH = "/usr/local/bin:/usr/bin:/bin"

# linux/sched.h, linux/mount.h, linux/prctl.h
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS = 38
SYS_PIVOT_ROOT = 155  # x86_64


class JailError(RuntimeError):
    """The jail could not be set up; ``str()`` says what to fix."""


@dataclass(frozen=True)
class JailConfig:
    """How VMMs are jailed on this host (the driver's constructor takes it; the site builds it
    from settings, ``from_env`` reads the same variables for tools and tests).

    ``mode``: ``on`` jails every VMM (and refuses to start one when it cannot), ``off`` starts
    them bare (for debugging: every start logs a warning), ``auto`` is ``on`` when this process
    is root (the launcher needs root) and ``off`` otherwise.
    """

    mode: str = "auto"  # one of JailMode, checked below
    uid_base: int = 100000
    uid_count: int = 10000
    state_dir: Path = Path("/run/microvm-sandbox-jail")
    cgroup_parent: str = "microvm-sandbox"
    memory_margin_mib: int = 256
    nofile: int = 4096
    nproc: int = 512
    pids_max: int = 512
    # More read-only paths in every jail (e.g. an interpreter's tree for a scripted VMM), and
    # names of environment variables to pass in (none in the product: tools and tests only).
    extra_ro: tuple[Path, ...] = ()
    pass_env: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in get_args(JailMode):
            raise JailError(f"SANDBOX_JAIL must be auto, on or off, got {self.mode!r}")
        if self.uid_base < 1000 or self.uid_count < 1 or self.uid_base + self.uid_count > 2**31:
            raise JailError("the jail uid range must lie within 1000..2^31")
        if not self.cgroup_parent or "/" in self.cgroup_parent or self.cgroup_parent[0] == ".":
            raise JailError(f"invalid jail cgroup name {self.cgroup_parent!r}")
        if self.memory_margin_mib < 32:
            raise JailError("the jail memory margin must be at least 32 MiB")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> JailConfig:
        env = os.environ if environ is None else environ
        try:
            return cls(
                mode=env.get("SANDBOX_JAIL", "auto").strip().lower(),
                uid_base=int(env.get("SANDBOX_JAIL_UID_BASE", "100000")),
                uid_count=int(env.get("SANDBOX_JAIL_UID_COUNT", "10000")),
                state_dir=Path(env.get("SANDBOX_JAIL_DIR", "/run/microvm-sandbox-jail")),
                cgroup_parent=env.get("SANDBOX_JAIL_CGROUP", "microvm-sandbox"),
                memory_margin_mib=int(env.get("SANDBOX_JAIL_MEMORY_MARGIN_MIB", "256")),
            )
        except ValueError as exc:
            raise JailError(f"invalid jail setting: {exc}") from exc

    @property
    def enabled(self) -> bool:
        if self.mode == "off":
            return False
        if self.mode == "on":
            return True
        return os.geteuid() == 0

    def check(self) -> None:
        """Raise unless jailing can work here (``on`` without root is a configuration error)."""
        if self.enabled and os.geteuid() != 0:
            raise JailError("SANDBOX_JAIL=on needs the worker to run as root (the launcher does)")

    def spec_for(
        self,
        vm_id: str,
        runtime: Path,
        pidfile: Path,
        *,
        ro: list[Path],
        rw: list[Path],
        devices: tuple[str, ...] = (),
        new_netns: bool,
        memory_mib: int,
        overhead_mib: int = 0,
        vcpus: int = 1,
    ) -> JailSpec:
        """The jail of one VM's VMM: ``ro``/``rw`` its files, limits from its size (memory:
        guest RAM + the VMM's own ``overhead_mib`` + the margin; CPU weight: 100 per vCPU;
        FSIZE: the largest file it writes, a writable disk or a saved RAM image, + 1 GiB)."""
        uid = allocate_uid(self, runtime)
        sizes = [p.stat().st_size for p in rw if p.exists()]
        return JailSpec(
            name=f"{vm_id}-{uid}",
            uid=uid,
            gid=uid,
            runtime=str(runtime),
            pidfile=str(pidfile),
            ro_paths=tuple(dict.fromkeys(str(p) for p in (*ro, *self.extra_ro))),
            rw_paths=tuple(dict.fromkeys(str(p) for p in rw)),
            devices=(*DEVICES, *devices),
            new_netns=new_netns,
            memory_bytes=(memory_mib + overhead_mib + self.memory_margin_mib) << 20,
            cpu_weight=min(10000, 100 * vcpus),
            pids_max=self.pids_max,
            nofile=self.nofile,
            nproc=self.nproc,
            fsize_bytes=max([memory_mib << 20, *sizes]) + (1 << 30),
            state_dir=str(self.state_dir),
            cgroup_parent=self.cgroup_parent,
            pass_env=tuple(self.pass_env),
        )

    def describe(self) -> dict[str, object]:
        """For status pages: the mode and whether VMMs are jailed, with a warning when not."""
        out: dict[str, object] = {"mode": self.mode, "jailed": self.enabled}
        if not self.enabled:
            out["warning"] = OFF_WARNING
        return out


OFF_WARNING = (
    "VMM jail is OFF (SANDBOX_JAIL): VMM processes run as the worker's user with the host's "
    "filesystem, namespaces and no cgroup limits; use this for debugging only"
)


@dataclass(frozen=True)
class JailSpec:
    """One VMM's jail: what the launcher needs (plain values, it travels as JSON)."""

    name: str
    uid: int
    gid: int
    runtime: str
    pidfile: str
    ro_paths: tuple[str, ...] = ()
    rw_paths: tuple[str, ...] = ()
    devices: tuple[str, ...] = DEVICES
    new_netns: bool = True
    memory_bytes: int = 0
    cpu_weight: int = 100  # cgroup v2 scale (1..10000; v1 shares = weight * 1024 / 100)
    pids_max: int = 512
    nofile: int = 4096
    nproc: int = 512
    fsize_bytes: int = 0  # 0: unlimited
    state_dir: str = "/run/microvm-sandbox-jail"
    cgroup_parent: str = "microvm-sandbox"
    pass_env: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> JailSpec:
        data: dict[str, Any] = json.loads(raw)
        for key in ("ro_paths", "rw_paths", "devices", "pass_env"):
            data[key] = tuple(data.get(key, ()))
        spec = cls(**data)
        spec.validate()
        return spec

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name[0] == "." or len(self.name) > 100:
            raise JailError(f"invalid jail name {self.name!r}")
        if self.uid < 1000 or self.gid < 1000:
            raise JailError("a jail never runs as a system user")
        for path in (self.runtime, self.pidfile, *self.ro_paths, *self.rw_paths, *self.devices):
            if not os.path.isabs(path) or os.path.normpath(path) != path or path == "/":
                raise JailError(f"jail paths must be absolute and normal, got {path!r}")
        for dev in self.devices:
            if not dev.startswith("/dev/"):
                raise JailError(f"not a device path: {dev!r}")

    @property
    def root(self) -> str:
        return os.path.join(self.state_dir, "roots", self.name)


@dataclass
class Cgroups:
    """This host's cgroup layout: v2 (unified at the mount point) or v1 (one per controller)."""

    mount: Path = Path("/sys/fs/cgroup")
    version: int = field(default=0)

    def __post_init__(self) -> None:
        if not self.version:
            self.version = 2 if (self.mount / "cgroup.controllers").exists() else 1

    def dirs(self, parent: str, name: str) -> dict[str, Path]:
        if self.version == 2:
            return {"unified": self.mount / parent / name}
        return {c: self.mount / c / parent / name for c in ("memory", "cpu", "pids")}

    def setup(self, spec: JailSpec) -> list[Path]:
        """Create the VM's cgroups, write its limits, and move this process into them."""
        dirs = self.dirs(spec.cgroup_parent, spec.name)
        if self.version == 2:
            wanted = {"memory", "cpu", "pids"}
            top = self.mount
            for level in (top, top / spec.cgroup_parent):
                level.mkdir(exist_ok=True)
                have = set((level / "cgroup.controllers").read_text().split())
                enable = " ".join(f"+{c}" for c in sorted(wanted & have))
                if enable:
                    _write(level / "cgroup.subtree_control", enable)
            d = dirs["unified"]
            d.mkdir(exist_ok=True)
            if spec.memory_bytes:
                _write(d / "memory.max", str(spec.memory_bytes))
                with contextlib.suppress(FileNotFoundError):
                    _write(d / "memory.swap.max", "0")
            _write(d / "cpu.weight", str(spec.cpu_weight))
            _write(d / "pids.max", str(spec.pids_max))
        else:
            for d in dirs.values():
                d.mkdir(parents=True, exist_ok=True)
            if spec.memory_bytes:
                mem = dirs["memory"]
                _write(mem / "memory.limit_in_bytes", str(spec.memory_bytes))
                with contextlib.suppress(FileNotFoundError, PermissionError, OSError):
                    _write(mem / "memory.memsw.limit_in_bytes", str(spec.memory_bytes))
            _write(dirs["cpu"] / "cpu.shares", str(max(2, spec.cpu_weight * 1024 // 100)))
            _write(dirs["pids"] / "pids.max", str(spec.pids_max))
        for d in dirs.values():
            _write(d / "cgroup.procs", str(os.getpid()))
        return list(dirs.values())

    def remove(self, parent: str, name: str, wait: float = 3.0) -> None:
        """Remove the VM's cgroups once its VMM is gone. The rest of its PID namespace dies
        with it, but not at once: a cgroup still busy is retried for ``wait`` seconds, then
        left (empty cgroups cost little; the next VM with its name reuses them)."""
        deadline = time.monotonic() + wait
        for d in self.dirs(parent, name).values():
            while True:
                try:
                    d.rmdir()
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                        break
                    time.sleep(0.02)
                else:
                    break

    def remove_uid(self, parent: str, uid: int) -> None:
        """Remove what is left of the cgroups of a uid's earlier holder (an idle one only)."""
        tops = (
            [self.mount / parent]
            if self.version == 2
            else [self.mount / c / parent for c in ("memory", "cpu", "pids")]
        )
        for top in tops:
            for d in top.glob(f"*-{uid}"):
                with contextlib.suppress(OSError):
                    d.rmdir()

    def remove_parent(self, parent: str) -> None:
        """Remove the product's parent cgroups if no VM's are left in them."""
        tops = (
            [self.mount / parent]
            if self.version == 2
            else [self.mount / c / parent for c in ("memory", "cpu", "pids")]
        )
        for top in tops:
            with contextlib.suppress(OSError):
                top.rmdir()

    def set_cpu_weight(self, parent: str, name: str, weight: int) -> None:
        """Change a VM's CPU weight (cgroup v2 scale, 1..10000; v1: shares) while it runs."""
        if not 1 <= weight <= 10000:
            raise JailError(f"a CPU weight is 1..10000, not {weight}")
        dirs = self.dirs(parent, name)
        if self.version == 2:
            _write(dirs["unified"] / "cpu.weight", str(weight))
        else:
            _write(dirs["cpu"] / "cpu.shares", str(max(2, weight * 1024 // 100)))

    def cpu_weight(self, parent: str, name: str) -> int | None:
        """A VM's CPU weight now (v2 scale), None when its cgroup is not there."""
        dirs = self.dirs(parent, name)
        path = dirs["unified"] / "cpu.weight" if self.version == 2 else dirs["cpu"] / "cpu.shares"
        try:
            raw = int(path.read_text().strip())
        except (OSError, ValueError):
            return None
        return raw if self.version == 2 else max(1, round(raw * 100 / 1024))

    def memory_limit(self, parent: str, name: str) -> int | None:
        d = next(iter(self.dirs(parent, name).values())) if self.version == 2 else None
        path = (
            d / "memory.max" if d else self.dirs(parent, name)["memory"] / "memory.limit_in_bytes"
        )
        try:
            raw = path.read_text().strip()
        except OSError:
            return None
        return None if raw == "max" else int(raw)


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise JailError(f"cannot write {value!r} to {path}: {exc.strerror}") from exc


# -- uid slots ----------------------------------------------------------------------------------
def allocate_uid(config: JailConfig, runtime: Path) -> int:
    """The uid of the VMM of ``runtime``: the same one for as long as the directory exists.

    A slot is a file ``<state_dir>/uids/<uid>`` naming its runtime directory, created with
    O_EXCL under a lock; a slot whose directory is gone is taken back (a VM destroyed without
    ``release``).
    """
    slots = config.state_dir / "uids"
    slots.mkdir(parents=True, exist_ok=True, mode=0o700)
    owner = str(runtime)
    with open(slots / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        taken: dict[int, str] = {}
        for entry in os.scandir(slots):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    taken[int(entry.name)] = Path(entry.path).read_text()
        for uid, path in taken.items():
            if path == owner:
                return uid
        for uid in range(config.uid_base, config.uid_base + config.uid_count):
            holder = taken.get(uid)
            if holder is not None and os.path.isdir(holder):
                continue
            if holder is not None:  # taken back: clear what its VM left (killed, not destroyed)
                Cgroups().remove_uid(config.cgroup_parent, uid)
                for root in (config.state_dir / "roots").glob(f"*-{uid}"):
                    with contextlib.suppress(OSError):
                        root.rmdir()
            tmp = slots / f".{uid}.tmp"
            tmp.write_text(owner)
            tmp.replace(slots / str(uid))
            return uid
    raise JailError(f"all {config.uid_count} jail uids from {config.uid_base} are in use")


def release(config: JailConfig, runtime: Path, name: str, cgroups: Cgroups | None = None) -> None:
    """Free what ``runtime``'s jail held on the host: its cgroups, its root's mount point and
    (when the runtime directory is gone) its uid. The last VM's release also removes the
    parent cgroups and the roots' directory, so a host with no jailed VMM keeps nothing of them
    (the state directory and its lock stay: removing a lock file others may wait on is a race)."""
    cgroups = cgroups or Cgroups()
    cgroups.remove(config.cgroup_parent, name)
    with contextlib.suppress(OSError):
        os.rmdir(config.state_dir / "roots" / name)
    if runtime.exists():
        return
    slots = config.state_dir / "uids"
    with contextlib.suppress(FileNotFoundError), open(slots / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        held = 0
        for entry in os.scandir(slots):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if Path(entry.path).read_text() == str(runtime):
                        os.unlink(entry.path)
                        continue
                held += 1
        # Under the lock, with no slot held, no VMM is between its uid and its cgroups.
        if not held:
            cgroups.remove_parent(config.cgroup_parent)
            with contextlib.suppress(OSError):
                os.rmdir(config.state_dir / "roots")


def reweigh(config: JailConfig, name: str, weight: int, cgroups: Cgroups | None = None) -> int:
    """Set the CPU weight of the jailed VMM ``name``; returns the weight it had (JailError when
    its cgroup is not there)."""
    cgroups = cgroups or Cgroups()
    before = cgroups.cpu_weight(config.cgroup_parent, name)
    if before is None:
        raise JailError(f"no CPU cgroup for {name}")
    cgroups.set_cpu_weight(config.cgroup_parent, name, weight)
    return before


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: no Landlock here)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION); 444 on x86_64.
        abi = int(libc.syscall(ctypes.c_long(444), None, ctypes.c_size_t(0), ctypes.c_uint32(1)))
    except (OSError, AttributeError):
        return 0
    return max(abi, 0)


def launcher_argv(spec: JailSpec) -> list[str]:
    """The argv prefix that runs a command in ``spec``'s jail (append ``--`` and the VMM's)."""
    spec.validate()
    return [sys.executable, "-I", "-S", os.path.abspath(__file__), spec.to_json()]


# -- the launcher (runs as root, before the VMM's exec) ------------------------------------------
_libc: ctypes.CDLL | None = None


def _c(name: str, *args: object) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    ret = int(getattr(_libc, name)(*args))
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(
            err, f"{name}{tuple(a for a in args if isinstance(a, bytes))}: {os.strerror(err)}"
        )
    return ret


def _mount(
    src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    _c(
        "mount",
        src.encode() if src else None,
        dst.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )


def _bind(src: str, dst: str, *, readonly: bool, extra: int = 0) -> None:
    _mount(src, dst, None, MS_BIND | MS_REC)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | extra | (MS_RDONLY if readonly else 0)
    _mount(None, dst, None, flags)


def _mountpoint(root: str, path: str, *, is_dir: bool) -> str:
    """Create ``path`` inside ``root`` (directories 0755) for a bind mount; return it."""
    target = root + path
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    if is_dir:
        os.makedirs(target, mode=0o755, exist_ok=True)
    elif not os.path.lexists(target):
        with open(target, "a"):
            pass
    return target


def _build_root(spec: JailSpec, exe: str) -> None:
    """In the new mount namespace: make the jail's root and pivot into it."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing of ours propagates to the host
    root = spec.root
    os.makedirs(root, mode=0o700, exist_ok=True)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m,nr_inodes=4096")
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            os.symlink(os.readlink(path), root + path)
        elif os.path.isdir(path):
            _bind(path, _mountpoint(root, path, is_dir=True), readonly=True, extra=MS_NODEV)
    for path in SYSTEM_FILES:
        if os.path.isfile(path):
            _bind(path, _mountpoint(root, path, is_dir=False), readonly=True, extra=MS_NODEV)
    for dev in spec.devices:
        if os.path.exists(dev):
            _bind(dev, _mountpoint(root, dev, is_dir=False), readonly=False, extra=MS_NOEXEC)
    os.makedirs(root + "/proc", mode=0o555, exist_ok=True)
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # The VMM's own files: the runtime directory first (shorter paths first, so that a file
    # inside a bound directory is bound over it, not under it).
    wanted = [(p, True) for p in (*spec.ro_paths, exe) if not _under_system(p)]
    wanted += [(p, False) for p in spec.rw_paths]
    wanted.append((spec.runtime, False))
    for path, readonly in sorted(wanted, key=lambda item: (item[0].count("/"), item[0])):
        if not os.path.exists(path):
            raise JailError(f"{path} does not exist")
        target = _mountpoint(root, path, is_dir=os.path.isdir(path))
        _bind(path, target, readonly=readonly, extra=MS_NODEV)
    # The jail's root itself is read-only: the binds above are the only ways in or out of it.
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(root)
    _c("syscall", ctypes.c_long(SYS_PIVOT_ROOT), b".", b".")
    _c("umount2", b".", ctypes.c_int(MNT_DETACH))  # the host's root, stacked under ours
    os.chdir("/")


def _under_system(path: str) -> bool:
    return any(path == d or path.startswith(d + "/") for d in SYSTEM_DIRS if not os.path.islink(d))


def _drop(spec: JailSpec) -> None:
    for limit, value in (
        (resource.RLIMIT_NOFILE, spec.nofile),
        (resource.RLIMIT_NPROC, spec.nproc),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(limit, (value, value))
    if spec.fsize_bytes:
        resource.setrlimit(resource.RLIMIT_FSIZE, (spec.fsize_bytes, spec.fsize_bytes))
    os.setgroups([])
    os.setresgid(spec.gid, spec.gid, spec.gid)
    os.setresuid(spec.uid, spec.uid, spec.uid)
    _c(
        "prctl",
        ctypes.c_int(PR_SET_NO_NEW_PRIVS),
        ctypes.c_ulong(1),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
    )
    if os.getuid() == 0 or os.geteuid() == 0:
        raise JailError("still root after dropping privileges")


def _child(spec: JailSpec, exe: str, argv: list[str]) -> None:
    os.setsid()  # the VMM leads its session and group (callers signal the group)
    _build_root(spec, exe)
    _drop(spec)
    os.chdir(spec.runtime)
    env = {"PATH": JAIL_PATH, "LANG": "C.UTF-8"}
    env.update({k: os.environ[k] for k in spec.pass_env if k in os.environ})
    os.execve(exe, argv, env)  # noqa: S606 - no shell


def _chown_writable(spec: JailSpec) -> None:
    # The runtime directory stays root's, writable by the VMM's group with the sticky bit: the
    # VMM can make its sockets and logs there but cannot remove, replace or rewrite the files
    # the host keeps there (vm.json, the pidfile, vmm.log).
    os.chown(spec.runtime, 0, spec.gid, follow_symlinks=False)
    os.chmod(spec.runtime, 0o1770)  # noqa: S103 - the VMM's group, sticky: see above
    for path in spec.rw_paths:
        os.chown(path, spec.uid, spec.gid, follow_symlinks=False)


def _readable_check(spec: JailSpec) -> None:
    for path in spec.ro_paths:
        mode = os.stat(path).st_mode
        need = 0o005 if os.path.isdir(path) else 0o004
        if mode & need != need:
            raise JailError(
                f"{path} is not readable by other users, so not by the jailed VMM: make it "
                "world-readable (it is shared, read-only) or leave it out of the spec"
            )


def main(args: list[str]) -> int:
    if len(args) < 3 or args[1] != "--":
        print("usage: jail.py SPEC_JSON -- VMM [ARGS...]", file=sys.stderr)
        return 2
    try:
        spec = JailSpec.from_json(args[0])
        argv = args[2:]
        # A bare name is looked up on the jail's PATH, never the caller's (a user's shims).
        exe = shutil.which(argv[0], path=None if "/" in argv[0] else JAIL_PATH)
        if exe is None:
            raise JailError(f"{argv[0]} not found on {JAIL_PATH}")
        exe = os.path.abspath(exe)
        _readable_check(spec)
        Cgroups().setup(spec)
        _chown_writable(spec)
        flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC
        if spec.new_netns:
            flags |= CLONE_NEWNET
        _c("unshare", ctypes.c_int(flags))
    except (JailError, OSError, ValueError, TypeError) as exc:
        print(f"jail: {exc}", file=sys.stderr)
        return 1
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # PID 1 of the new namespace
        os.close(read_end)
        try:
            _child(spec, exe, argv)
        except BaseException as exc:  # noqa: BLE001 - anything before exec is reported, then exit
            with contextlib.suppress(OSError):
                os.write(write_end, f"{type(exc).__name__}: {exc}".encode()[:4000])
        os._exit(127)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 4096):
        chunks.append(chunk)
    if chunks:  # the child failed before its exec (a successful exec closes the pipe empty)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        print(f"jail: {b''.join(chunks).decode(errors='replace')}", file=sys.stderr)
        return 1
    # A fresh name (O_EXCL): the VMM, already running, cannot have planted it.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(spec.pidfile), prefix=".pid.")
    with os.fdopen(fd, "w") as f:
        f.write(f"{pid}\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, spec.pidfile)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
