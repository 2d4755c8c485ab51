"""The Cloud Hypervisor driver's jail, on the simulator: the VMM process (here the simulator, a
Python program) runs in the jail of ``vms.hypervisors.jail`` and the whole lifecycle still works,
snapshots included (a jailed VMM writes them into its runtime directory; the driver moves them).
Its own sandboxing is asked for on the wire: ``--seccomp true`` and, where the VMM's version and
the kernel have it, Landlock in the VmConfig (validated against the API document elsewhere).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chsim.spec import REPO_ROOT
from vms.agent.client import AgentClient
from vms.hypervisors import jail
from vms.hypervisors.base import HypervisorError, RuntimeDir, VMSpec, VMState
from vms.hypervisors.chapi import ChApi
from vms.hypervisors.cloud_hypervisor import CH_SNAPSHOT_FILES, JAIL_RECORD, CloudHypervisor

AGENT = REPO_ROOT / "images" / "agent" / "sandbox_agent.py"


def _uid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0])


def _exec(driver: CloudHypervisor, runtime: RuntimeDir, text: str) -> bytes:
    with AgentClient(lambda: driver.agent_connect(runtime, 10), timeout=10) as agent:
        agent.hello_enrolling("jail-test-credential-0123456789-abcdefghijkl", timeout=15)
        result = agent.exec(["echo", text], timeout=10)
    assert result.ok
    return result.stdout


def test_a_jailed_vmm_runs_the_lifecycle_under_its_own_uid_namespaces_and_cgroups(
    jailed_driver: CloudHypervisor,
    workdir: Path,
    make_spec: Callable[..., VMSpec],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    driver = jailed_driver
    runtime = RuntimeDir(workdir / "rt")
    record = runtime.root / "requests.jsonl"  # the only place a jailed simulator can write
    monkeypatch.setenv("CHSIM_RECORD", str(record))
    agent = [sys.executable, "-I", "-S", str(AGENT), "--listen-unix", "{listen}"]
    monkeypatch.setenv("CHSIM_GUEST_AGENT", json.dumps(agent))
    spec = make_spec()
    try:
        pid = driver.start(spec, runtime)
        assert driver.info(runtime).state is VMState.RUNNING
        jailed = json.loads((runtime.root / JAIL_RECORD).read_text())
        assert _uid(pid) == jailed["uid"] >= driver.jail.uid_base
        status = Path(f"/proc/{pid}/status").read_text()
        assert "NoNewPrivs:\t1" in status
        for ns in ("pid", "mnt", "ipc"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
        # A TAP by name is opened in the VMM's own namespace: it keeps the host's.
        assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")
        cgroup = Path(f"/proc/{pid}/cgroup").read_text()
        assert f"/{driver.jail.cgroup_parent}/{jailed['name']}" in cgroup
        limit = jail.Cgroups().memory_limit(driver.jail.cgroup_parent, jailed["name"])
        assert limit == (512 + driver.jail.memory_margin_mib) << 20  # max_memory_mib + margin

        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--seccomp") + 1] == b"true"
        sent = [json.loads(line) for line in record.read_text().splitlines()]
        create = json.loads(next(r["body"] for r in sent if r["path"].endswith("/vm.create")))
        if jail.landlock_abi() > 0:  # the simulator says it is v53: Landlock since v41
            assert create["landlock_enable"] is True
            assert create["landlock_rules"] == [{"path": str(runtime.root), "access": "rw"}]
        else:
            assert "landlock_enable" not in create

        assert _exec(driver, runtime, "jailed") == b"jailed\n"

        # The VMM cannot write outside its jail: asked directly, its snapshot fails there ...
        outside = workdir / "direct"
        outside.mkdir()
        ChApi(runtime.control_socket).call("vm.pause")
        with pytest.raises(HypervisorError):
            ChApi(runtime.control_socket).call(
                "vm.snapshot", {"destination_url": f"file://{outside}"}
            )
        assert list(outside.iterdir()) == []
        ChApi(runtime.control_socket).call("vm.resume")
        # ... while the driver's snapshot lands where asked, as root's files.
        snap = workdir / "snap"
        snap.mkdir()
        files = driver.snapshot(runtime, snap)
        assert set(CH_SNAPSHOT_FILES) <= {p.name for p in files.files}
        for name in CH_SNAPSHOT_FILES:
            st = (snap / name).stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
        assert not (runtime.root / "snapshot-stage").exists()

        driver.stop_hard(runtime)
        assert not driver.is_alive(runtime)
        assert jail.Cgroups().memory_limit(driver.jail.cgroup_parent, jailed["name"]) is None

        new_pid = driver.restore(spec, runtime, files)
        assert new_pid != pid and _uid(new_pid) == jailed["uid"]  # the same VM, the same uid
        assert driver.info(runtime).state is VMState.RUNNING
        assert _exec(driver, runtime, "restored") == b"restored\n"
    finally:
        driver.destroy(runtime)
    assert not runtime.root.exists()
    uids = driver.jail.state_dir / "uids"
    assert all(p.read_text() != str(runtime.root) for p in uids.iterdir() if p.name.isdigit())


def test_seccomp_mode_is_validated() -> None:
    with pytest.raises(HypervisorError, match="--seccomp"):
        CloudHypervisor(seccomp="off", jail_config=jail.JailConfig(mode="off"))


def test_every_unjailed_vmm_start_logs_a_warning(
    driver: CloudHypervisor,
    runtime: RuntimeDir,
    make_spec: Callable[..., VMSpec],
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert not driver.jail.enabled
    driver.start(make_spec(), runtime)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert any(jail.OFF_WARNING in r.getMessage() for r in warnings)
    assert not (runtime.root / JAIL_RECORD).exists()


def test_the_driver_refuses_a_socket_the_vmm_put_in_place_of_its_own(
    jailed_driver: CloudHypervisor,
    workdir: Path,
    make_spec: Callable[..., VMSpec],
) -> None:
    runtime = RuntimeDir(workdir / "rt")
    decoy_path = workdir / "decoy.sock"
    decoy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    decoy.bind(str(decoy_path))
    decoy.listen(4)
    try:
        jailed_driver.start(make_spec(), runtime)
        for name in ("control.sock", "agent.sock"):
            os.rename(runtime.root / name, runtime.root / f"{name}.real")
            (runtime.root / name).symlink_to(decoy_path)
        with pytest.raises(HypervisorError, match="not the VMM"):
            jailed_driver.info(runtime)
        with pytest.raises(HypervisorError, match="not the VMM"):
            jailed_driver.agent_connect(runtime, 2.0)
        for name in ("control.sock", "agent.sock"):
            (runtime.root / name).unlink()
            os.rename(runtime.root / f"{name}.real", runtime.root / name)
        assert jailed_driver.info(runtime).state is VMState.RUNNING
    finally:
        decoy.close()
        jailed_driver.destroy(runtime)
