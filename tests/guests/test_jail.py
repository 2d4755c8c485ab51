"""Jailed QEMU guests (``vms.hypervisors.jail``): what the VMM can and cannot reach.

The guests here are jailed because jailing is the default for a root worker; each test checks
that it really is before relying on it. What a jailed process can open is shown twice: by the
jailed QEMU itself (asked over QMP to open host files) and by a probe program started by the
same launcher with the same jail as a VM's (it reports what it could open, its ids, its limits).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from vms.hypervisors import jail
from vms.hypervisors.base import HypervisorError, RuntimeDir, VMSpec, VMState
from vms.hypervisors.qemu import QemuHypervisor
from vms.hypervisors.qmp import QMPClient, QMPError

from .conftest import Guest

PROBE = r"""
import errno, json, os, sys
out = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "pid": os.getpid()}
status = open("/proc/self/status").read()
out["no_new_privs"] = status.split("NoNewPrivs:")[1].split()[0]
out["environ"] = sorted(os.environ)
opened = {}
for path in json.loads(sys.argv[1]):
    try:
        with open(path, "rb") as f:
            f.read(1)
        opened[path] = "read"
    except OSError as exc:
        opened[path] = errno.errorcode[exc.errno]
out["opened"] = opened
written = {}
for path in json.loads(sys.argv[2]):
    try:
        with open(path, "ab") as f:
            f.write(b"")
        written[path] = "written"
    except OSError as exc:
        written[path] = errno.errorcode[exc.errno]
out["written"] = written
import resource
out["rlimits"] = {n: resource.getrlimit(getattr(resource, n))[0]
                  for n in ("RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_CORE", "RLIMIT_FSIZE")}
out["etc"] = sorted(os.listdir("/etc"))
print(json.dumps(out), flush=True)
"""

HOG = r"""
import sys
print("allocating", flush=True)
hog = b"x" * (int(sys.argv[1]) << 20)  # every byte written: every page charged
print("survived", len(hog), flush=True)
"""


def _jailed(hv: QemuHypervisor) -> None:
    assert hv.jail.enabled, "these tests run as root, where VMMs are jailed by default"


def _probe_jail(hv: QemuHypervisor, spec: VMSpec, runtime: RuntimeDir) -> jail.JailSpec:
    """The jail a VM of ``spec`` in ``runtime`` gets, for a probe program instead of QEMU."""
    runtime.create()
    return hv.jail_spec(spec, runtime, "tcg")


def _run_in_jail(js: jail.JailSpec, *args: str, timeout: float = 120.0) -> tuple[int, str, str]:
    """Run ``python3 -I -c ...`` under the launcher; wait for the launcher and the probe (both
    hold the output pipes until they exit)."""
    argv = [*jail.launcher_argv(js), "--", "python3", "-I", "-c", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    return done.returncode, done.stdout, done.stderr


def test_a_jailed_guest_boots_runs_exec_snapshots_and_restores(
    start_guest: Callable[..., Guest], runtime_root: Path
) -> None:
    guest = start_guest("jailed")
    _jailed(guest.hv)
    pid = guest.runtime.pid()
    assert pid is not None
    status = Path(f"/proc/{pid}/status").read_text()
    uid = int(status.split("Uid:")[1].split()[0])
    assert uid >= guest.hv.jail.uid_base
    assert "NoNewPrivs:\t1" in status
    for ns in ("pid", "mnt", "ipc", "net"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    # The pid the driver reports is the host's view of QEMU: its CPU and memory are readable.
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"qemu-system-x86_64")
    assert int(Path(f"/proc/{pid}/statm").read_text().split()[1]) > 0

    result = guest.client.exec(["sh", "-c", "echo jailed > /tmp/mark && uname -s"])
    assert result.exit_code == 0 and result.stdout.strip() == b"Linux"

    snapdir = runtime_root / "jail-snap"
    snapdir.mkdir()
    snap = guest.hv.snapshot(guest.runtime, snapdir)
    guest.client.close()
    guest.hv.stop_hard(guest.runtime)
    new_pid = guest.hv.restore(guest.spec, guest.runtime, snap)
    assert new_pid != pid
    assert guest.hv.info(guest.runtime).state is VMState.RUNNING
    assert int(Path(f"/proc/{new_pid}/status").read_text().split("Uid:")[1].split()[0]) == uid
    client = guest.reconnect(timeout=60)
    assert client.exec(["cat", "/tmp/mark"]).stdout.strip() == b"jailed"


def test_the_jailed_qemu_cannot_open_a_host_file_outside_its_jail(
    shared_guest: Guest, start_guest: Callable[..., Guest]
) -> None:
    _jailed(shared_guest.hv)
    other = start_guest("neighbour")
    outside = [Path("/etc/shadow"), other.runtime.root / "vm.json", Path(jail.__file__)]
    with QMPClient.connect(shared_guest.runtime.control_socket, 10.0) as qmp:
        for i, path in enumerate(outside):
            assert path.exists()  # on the host it is there
            with pytest.raises(QMPError, match="No such file or directory"):
                qmp.execute(
                    "blockdev-add",
                    {
                        "driver": "file",
                        "node-name": f"probe{i}",
                        "filename": str(path),
                        "read-only": True,
                    },
                )
        # What is in the jail can be opened: its own runtime directory's files.
        own = shared_guest.runtime.root / "vm.json"
        qmp.execute(
            "blockdev-add",
            {"driver": "file", "node-name": "own", "filename": str(own), "read-only": True},
        )
        qmp.execute("blockdev-del", {"node-name": "own"})


def test_a_probe_in_a_vms_jail_sees_only_that_vms_files(
    hv: QemuHypervisor,
    make_spec: Callable[..., VMSpec],
    shared_guest: Guest,
    runtime_root: Path,
) -> None:
    _jailed(hv)
    runtime = RuntimeDir(runtime_root / "probe")
    spec = make_spec("probe")
    js = _probe_jail(hv, spec, runtime)
    try:
        assert spec.kernel is not None
        readable = [str(spec.kernel), str(spec.disks[0].path), str(runtime.root / "vmm.log")]
        forbidden = [
            "/etc/shadow",
            "/etc/passwd",
            str(shared_guest.runtime.root / "vm.json"),
            str(Path.home() / ".bash_history"),
            str(Path(jail.__file__)),
        ]
        runtime.vmm_log.write_text("")
        writes = [str(runtime.root / "new-file"), str(spec.kernel), "/usr/bin/python3", "/x"]
        code, out, err = _run_in_jail(
            js, PROBE, json.dumps(readable + forbidden), json.dumps(writes)
        )
        assert code == 0, err
        report = json.loads(out)
    finally:
        hv.destroy(runtime)
        jail.release(hv.jail, runtime.root, js.name)
    assert report["uid"] == js.uid and report["gid"] == js.gid and report["groups"] == []
    assert report["uid"] != os.getuid()
    assert report["pid"] == 1  # its own PID namespace
    assert report["no_new_privs"] == "1"
    assert report["environ"] == ["LANG", "PATH"]  # nothing of the control plane's environment
    for path in readable:
        assert report["opened"][path] == "read", path
    for path in forbidden:
        assert report["opened"][path] == "ENOENT", path  # not in the jail at all
    written = report["written"]
    assert written.pop(str(runtime.root / "new-file")) == "written"
    # Elsewhere nothing can be written: files not its own, read-only mounts.
    assert set(written.values()) <= {"EACCES", "EROFS"}, written
    assert report["rlimits"]["RLIMIT_CORE"] == 0
    assert report["rlimits"]["RLIMIT_NOFILE"] == js.nofile
    assert report["rlimits"]["RLIMIT_NPROC"] == js.nproc
    assert report["rlimits"]["RLIMIT_FSIZE"] == js.fsize_bytes
    assert report["etc"] == ["ld.so.cache"]  # of /etc, only the loader's cache


def test_the_jailed_qemu_is_in_its_memory_cgroup_with_the_limit_from_its_spec(
    shared_guest: Guest,
) -> None:
    _jailed(shared_guest.hv)
    pid = shared_guest.runtime.pid()
    record = json.loads((shared_guest.runtime.root / "vm.json").read_text())["jail"]
    cgroups = jail.Cgroups()
    limit = cgroups.memory_limit(shared_guest.hv.jail.cgroup_parent, record["name"])
    expected = (
        shared_guest.spec.memory_mib
        + shared_guest.hv.tb_size_mib
        + shared_guest.hv.jail.memory_margin_mib
    ) << 20
    assert limit == expected
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    where = f"/{shared_guest.hv.jail.cgroup_parent}/{record['name']}"
    if cgroups.version == 1:
        assert any(line.split(":")[1] == "memory" and line.endswith(where) for line in lines)
        usage = Path(
            f"/sys/fs/cgroup/memory/{shared_guest.hv.jail.cgroup_parent}/{record['name']}"
            "/memory.usage_in_bytes"
        ).read_text()
    else:
        assert f"0::{where}" in lines
        usage = Path(
            f"/sys/fs/cgroup/{shared_guest.hv.jail.cgroup_parent}/{record['name']}/memory.current"
        ).read_text()
    # QEMU's memory is charged there, and under the limit.
    assert 32 << 20 < int(usage) < expected


def test_a_process_in_a_vms_jail_that_allocates_past_its_memory_limit_is_killed(
    hv: QemuHypervisor, make_spec: Callable[..., VMSpec], runtime_root: Path
) -> None:
    _jailed(hv)
    runtime = RuntimeDir(runtime_root / "hog")
    js = dataclasses.replace(_probe_jail(hv, make_spec("hog"), runtime), memory_bytes=96 << 20)
    try:
        # Within the limit it runs to the end ...
        code, out, err = _run_in_jail(js, HOG, "16")
        assert code == 0, err
        assert "survived" in out
        # ... past it, the kernel kills it before it finishes.
        code, out, err = _run_in_jail(js, HOG, "256")
        assert code == 0, err  # the launcher exec'd the probe
        assert "allocating" in out and "survived" not in out
        cgroups = jail.Cgroups()
        if cgroups.version == 1:
            mem = Path(f"/sys/fs/cgroup/memory/{js.cgroup_parent}/{js.name}")
            assert "oom_kill 1" in (mem / "memory.oom_control").read_text()
            assert int((mem / "memory.max_usage_in_bytes").read_text()) == 96 << 20
        else:
            events = Path(f"/sys/fs/cgroup/{js.cgroup_parent}/{js.name}/memory.events")
            assert "oom_kill 1" in events.read_text().splitlines()
    finally:
        hv.destroy(runtime)
        jail.release(hv.jail, runtime.root, js.name)


def test_the_driver_refuses_a_socket_the_vmm_put_in_place_of_its_own(
    start_guest: Callable[..., Guest], runtime_root: Path
) -> None:
    guest = start_guest("linked")
    _jailed(guest.hv)
    guest.client.close()
    # Another server's socket (here the test's own), linked where QMP and the agent should be.
    decoy_path = runtime_root / "decoy.sock"
    decoy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    decoy.bind(str(decoy_path))
    decoy.listen(4)
    runtime = guest.runtime
    try:
        for name in ("control.sock", "agent.sock"):
            os.rename(runtime.root / name, runtime.root / f"{name}.real")
            (runtime.root / name).symlink_to(decoy_path)
        with pytest.raises(HypervisorError, match="not the VMM"):
            guest.hv.info(runtime)
        with pytest.raises(HypervisorError, match="not the VMM"):
            guest.hv.agent_connect(runtime, 2.0)
    finally:
        decoy.close()
        for name in ("control.sock", "agent.sock"):
            (runtime.root / name).unlink()
            os.rename(runtime.root / f"{name}.real", runtime.root / name)
    assert guest.hv.info(runtime).state is VMState.RUNNING
    assert guest.reconnect().exec(["true"]).exit_code == 0
