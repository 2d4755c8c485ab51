"""Lifecycle flows of the Cloud Hypervisor driver against the spec-driven simulator.

The simulator runs as a fake ``cloud-hypervisor`` executable, so the driver's own process
handling (session, pidfile, log, identity check, SIGTERM/SIGKILL) is what is exercised. Where a
real guest agent is available (``images/agent/sandbox_agent.py`` and ``vms.agent.client``), the
simulated guest runs it on the host behind the hybrid-vsock relay and the tests speak to it
through ``AgentClient``; otherwise the guest is an echo service.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.chsim.spec import REPO_ROOT
from vms.hypervisors.base import (
    DiskSpec,
    HypervisorError,
    NetSpec,
    NotSupported,
    RuntimeDir,
    SnapshotFiles,
    VMSpec,
    VMState,
)
from vms.hypervisors.chapi import ChApi, ChApiError
from vms.hypervisors.cloud_hypervisor import (
    CH_SNAPSHOT_FILES,
    SNAPSHOT_META,
    CloudHypervisor,
    ResizeBusy,
)
from vms.hypervisors.process import wait_for

AGENT = REPO_ROOT / "images" / "agent" / "sandbox_agent.py"
# What the simulated guests' agents are enrolled with (a fresh agent takes it on first use).
CREDENTIAL = "chsim-test-credential-0123456789-abcdefghijk"


def _agent_client() -> Any:
    try:
        from vms.agent.client import AgentClient
    except ImportError:
        return None
    return AgentClient


@pytest.fixture
def real_agent(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make the simulated guest run the real agent; returns ``AgentClient``."""
    client = _agent_client()
    if not AGENT.is_file() or client is None:
        pytest.skip("guest agent (images/agent/sandbox_agent.py, vms.agent.client) not present")
    argv = [sys.executable, "-I", "-S", str(AGENT), "--listen-unix", "{listen}"]
    monkeypatch.setenv("CHSIM_GUEST_AGENT", json.dumps(argv))
    return client


def _echo(sock: socket.socket, data: bytes = b"ping\n") -> bytes:
    sock.settimeout(5)
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def _read_until(sock: socket.socket, marker: bytes, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    got = b""
    deadline = time.monotonic() + timeout
    while marker not in got and time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def _serial(runtime: RuntimeDir) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(runtime.serial_socket))
    return sock


def _records(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [json.loads(line)["path"].rsplit("/", 1)[-1] for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------ lifecycle


def test_full_lifecycle_with_the_real_agent(
    driver: CloudHypervisor,
    runtimes: Callable[..., RuntimeDir],
    make_spec: Callable[..., VMSpec],
    workdir: Path,
    real_agent: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = workdir / "requests.jsonl"
    monkeypatch.setenv("CHSIM_RECORD", str(record))
    runtime = runtimes("a")
    spec = make_spec()
    pid = driver.start(spec, runtime)
    assert pid == runtime.pid() and driver.is_alive(runtime)
    info = driver.info(runtime)
    assert (info.state, info.pid, info.vcpus, info.memory_mib) == (VMState.RUNNING, pid, 1, 256)
    assert {"root", "data", "net0", "vsock0"} <= set(info.detail["devices"])

    with real_agent(lambda: driver.agent_connect(runtime, 10), timeout=10) as agent:
        hello = agent.hello_enrolling(CREDENTIAL, timeout=15)
        assert hello.protocol == 2
        result = agent.exec(["echo", "from the guest"], timeout=10)
        assert result.ok and result.stdout == b"from the guest\n"

    driver.pause(runtime)
    assert driver.info(runtime).state is VMState.PAUSED
    driver.resume(runtime)
    assert driver.info(runtime).state is VMState.RUNNING

    first = driver.counters(runtime)
    time.sleep(0.05)
    second = driver.counters(runtime)
    assert set(first) == {"root", "data", "net0"}
    assert second["data"]["read_bytes"] > first["data"]["read_bytes"]
    assert second["net0"]["rx_frames"] > first["net0"]["rx_frames"]
    assert second["root"]["write_bytes"] == 0  # read-only disk

    driver.resize(runtime, vcpus=2, memory_mib=384)
    info = driver.info(runtime)
    assert (info.vcpus, info.memory_mib) == (2, 384)

    snap = workdir / "snap"
    snap.mkdir()
    data_disk = spec.disks[1].path
    data_disk.write_bytes(data_disk.read_bytes() + b"written before the snapshot")
    files = driver.snapshot(runtime, snap)
    assert driver.info(runtime).state is VMState.PAUSED  # left paused for the caller
    names = {p.name for p in files.files}
    assert set(CH_SNAPSHOT_FILES) | {SNAPSHOT_META, "disk1-data.qcow2"} == names
    assert (snap / "disk1-data.qcow2").read_bytes() == data_disk.read_bytes()
    meta = json.loads((snap / SNAPSHOT_META).read_text())
    assert [(d["id"], d["copy"]) for d in meta["disks"]] == [
        ("root", None),
        ("data", "disk1-data.qcow2"),
    ]

    driver.stop_hard(runtime)
    assert not driver.is_alive(runtime)
    assert not runtime.agent_socket.exists() and not runtime.pidfile.exists()
    data_disk.write_bytes(b"changed after the snapshot")

    target = runtimes("b")
    restored_disk = workdir / "restored-data.qcow2"
    restored = spec.replace(
        disks=(
            spec.disks[0],
            DiskSpec(path=restored_disk, format="qcow2", id="data"),
        )
    )
    new_pid = driver.restore(restored, target, files)
    assert new_pid != pid and driver.is_alive(target)
    info = driver.info(target)
    assert (info.state, info.vcpus, info.memory_mib) == (VMState.RUNNING, 2, 384)
    assert restored_disk.read_bytes().endswith(b"written before the snapshot")
    assert not (target.root / "restore").exists()  # staged files are gone

    with real_agent(lambda: driver.agent_connect(target, 10), timeout=10) as agent:
        agent.hello_enrolling(CREDENTIAL, timeout=15)
        assert agent.exec(["true"], timeout=10).ok

    driver.power_button(target)
    assert wait_for(lambda: not driver.is_alive(target), 5)
    assert driver.info(target).state is VMState.DEAD

    sent = _records(record)
    assert sent.index("vm.restore") < sent.index("vm.resume", sent.index("vm.restore"))


def test_restore_relocates_sockets_and_rewrites_the_config(
    driver: CloudHypervisor,
    runtimes: Callable[..., RuntimeDir],
    make_spec: Callable[..., VMSpec],
    workdir: Path,
) -> None:
    source, target = runtimes("src"), runtimes("dst")
    spec = make_spec()
    driver.start(spec, source)
    snap = workdir / "s"
    snap.mkdir()
    files = driver.snapshot(runtime=source, directory=snap)
    driver.destroy(source)
    driver.restore(
        spec.replace(nets=(NetSpec(tap="tap-new", mac="52:54:00:aa:bb:cc"),)),
        target,
        files,
    )
    config = ChApi(target.control_socket).info()["config"]
    assert config["vsock"]["socket"] == str(target.agent_socket)
    assert config["serial"]["socket"] == str(target.serial_socket)
    assert (config["net"][0]["tap"], config["net"][0]["mac"]) == ("tap-new", "52:54:00:aa:bb:cc")
    # The snapshot itself is untouched: it can be restored again elsewhere.
    saved = json.loads((snap / "config.json").read_text())
    assert saved["vsock"]["socket"] == str(source.agent_socket)
    with driver.agent_connect(target, 5) as sock:
        assert _echo(sock) == b"ping\n"


def test_a_snapshot_tells_how_many_nics_its_guest_has(
    driver: CloudHypervisor,
    runtimes: Callable[..., RuntimeDir],
    make_spec: Callable[..., VMSpec],
    workdir: Path,
) -> None:
    for i, nets in enumerate([(), (NetSpec(tap="tap-a", mac="52:54:00:aa:bb:01"),)]):
        rt = runtimes(f"n{i}")
        driver.start(make_spec(nets=nets), rt)
        snap = workdir / f"s{i}"
        snap.mkdir()
        files = driver.snapshot(runtime=rt, directory=snap)
        driver.destroy(rt)
        assert driver.snapshot_nics(files) == len(nets)
    (workdir / "s1" / "config.json").write_text("{not json")
    with pytest.raises(HypervisorError, match="unreadable config.json"):
        driver.snapshot_nics(files)


def test_suspend_to_disk_and_restore_in_the_same_runtime_directory(
    driver: CloudHypervisor,
    runtimes: Callable[..., RuntimeDir],
    make_spec: Callable[..., VMSpec],
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What an idle VM's suspend to disk asks of the driver (vms.worker.suspend_to_disk and
    resume_from_disk): a snapshot into the VM's data dir, its VMM destroyed (its runtime
    directory gone), then a restore of the same spec (same disks, same taps) into a runtime
    directory of the same path, with ``vm.restore`` from the saved files and ``vm.resume``."""
    record = workdir / "requests.jsonl"
    monkeypatch.setenv("CHSIM_RECORD", str(record))
    runtime = runtimes("idle")
    spec = make_spec()
    pid = driver.start(spec, runtime)
    data_disk = spec.disks[1].path
    data_disk.write_bytes(data_disk.read_bytes() + b"written before the suspend")
    saved = workdir / "vmdata" / "suspended"
    saved.mkdir(parents=True)
    files = driver.snapshot(runtime, saved)
    assert driver.snapshot_nics(files) == 1
    driver.destroy(runtime)
    assert not driver.is_alive(runtime) and not runtime.root.exists()
    assert all(Path(f).is_file() for f in files.files)  # the saved state outlives its VMM

    new_pid = driver.restore(spec, runtime, files)
    assert new_pid != pid and driver.is_alive(runtime)
    assert driver.info(runtime).state is VMState.RUNNING
    assert data_disk.read_bytes().endswith(b"written before the suspend")
    config = ChApi(runtime.control_socket).info()["config"]
    assert config["net"][0]["tap"] == spec.nets[0].tap
    with driver.agent_connect(runtime, 5) as sock:
        assert _echo(sock) == b"ping\n"
    sent = _records(record)
    restore_at = sent.index("vm.restore")
    assert sent.index("vm.snapshot") < restore_at < sent.index("vm.resume", restore_at)


# -------------------------------------------------------------------------- error paths


def test_server_refuses_a_snapshot_of_a_running_vm(
    driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Callable[..., VMSpec], workdir: Path
) -> None:
    driver.start(make_spec(), runtime)
    with pytest.raises(HypervisorError, match="Trying to snapshot while VM is running") as err:
        ChApi(runtime.control_socket).call("vm.snapshot", {"destination_url": f"file://{workdir}"})
    assert isinstance(err.value, ChApiError) and err.value.status == 500  # the spec says 405
    assert err.value.messages[0] == "Error from API"


def test_snapshot_into_a_non_empty_directory_is_refused_before_pausing(
    driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Callable[..., VMSpec], workdir: Path
) -> None:
    driver.start(make_spec(), runtime)
    snap = workdir / "busy"
    snap.mkdir()
    (snap / "config.json").write_text("{}")
    with pytest.raises(HypervisorError, match="not empty"):
        driver.snapshot(runtime, snap)
    with pytest.raises(HypervisorError, match="does not exist"):
        driver.snapshot(runtime, workdir / "missing")
    assert driver.info(runtime).state is VMState.RUNNING


def test_server_refuses_to_overwrite_snapshot_files(
    driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Callable[..., VMSpec], workdir: Path
) -> None:
    driver.start(make_spec(), runtime)
    driver.pause(runtime)
    (workdir / "config.json").write_text("old snapshot")
    with pytest.raises(ChApiError, match="File exists") as err:
        ChApi(runtime.control_socket).call("vm.snapshot", {"destination_url": f"file://{workdir}"})
    assert err.value.status == 500
    assert (workdir / "config.json").read_text() == "old snapshot"


def test_a_second_pause_fails_with_the_servers_message(
    driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Callable[..., VMSpec]
) -> None:
    driver.start(make_spec(), runtime)
    driver.pause(runtime)
    with pytest.raises(HypervisorError, match=r"vm.pause failed \(HTTP 500\): .*already paused"):
        driver.pause(runtime)
    driver.resume(runtime)
    with pytest.raises(HypervisorError, match=r"vm.resume failed \(HTTP 500\)"):
        driver.resume(runtime)
    assert driver.info(runtime).state is VMState.RUNNING


def test_a_boot_failure_surfaces_the_server_error_and_leaves_nothing_running(
    driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Callable[..., VMSpec], workdir: Path
) -> None:
    spec = make_spec(kernel=workdir / "no-such-kernel")
    with pytest.raises(HypervisorError, match=r"vm.boot failed \(HTTP 500\).*Cannot open kernel"):
        driver.start(spec, runtime)
    assert not driver.is_alive(runtime)
    assert not runtime.pidfile.exists() and not runtime.control_socket.exists()
    assert "vm.boot" in runtime.vmm_log.read_text()  # the log is kept for the operator


def test_start_refuses_a_second_vmm_and_a_missing_binary(
    driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Callable[..., VMSpec], workdir: Path
) -> None:
    driver.start(make_spec(), runtime)
    with pytest.raises(HypervisorError, match="already runs"):
        driver.start(make_spec(), runtime)
    missing = CloudHypervisor(binary=workdir / "bin" / "cloud-hypervisor")
    with pytest.raises(HypervisorError, match="not found"):
        missing.start(make_spec(), RuntimeDir(workdir / "other"))


def test_is_alive_checks_the_command_line_not_just_the_pid(
    driver: CloudHypervisor, runtime: RuntimeDir
) -> None:
    runtime.create()
    runtime.pidfile.write_text(f"{os.getpid()}\n")  # a live process, but not this VM's VMM
    assert not driver.is_alive(runtime)
    assert driver.info(runtime).state is VMState.DEAD
    with pytest.raises(HypervisorError, match="no cloud-hypervisor process"):
        driver.pause(runtime)
    driver.stop_hard(runtime)  # must not signal the pytest process
    assert not runtime.pidfile.exists()


# ---------------------------------------------------------------------- guest actions


def test_reboot_restarts_the_guest_in_the_same_process(
    driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Callable[..., VMSpec]
) -> None:
    pid = driver.start(make_spec(), runtime)
    with _serial(runtime) as console:
        banner = _read_until(console, b"login: ")
        assert b"booting" in banner
        driver.reboot(runtime)
        after = _read_until(console, b"login: ")
    assert b"Restarting system" in after
    assert banner.split()[2] != after.split(b"guest ")[1].split()[0]  # a new boot id
    assert runtime.pid() == pid and driver.info(runtime).state is VMState.RUNNING
    with driver.agent_connect(runtime, 5) as sock:
        assert _echo(sock) == b"ping\n"


def test_power_button_lets_the_guest_power_off_and_the_vmm_exit(
    driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Callable[..., VMSpec]
) -> None:
    driver.start(make_spec(), runtime)
    driver.power_button(runtime)
    assert wait_for(lambda: not driver.is_alive(runtime), 5)
    assert driver.info(runtime).state is VMState.DEAD
    with pytest.raises(HypervisorError, match="no cloud-hypervisor process"):
        driver.agent_connect(runtime, 1)


def test_shutdown_vm_keeps_the_vmm_and_boot_starts_it_again(
    driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Callable[..., VMSpec]
) -> None:
    driver.start(make_spec(), runtime)
    driver.shutdown_vm(runtime)
    assert driver.info(runtime).state is VMState.SHUTDOWN
    assert driver.is_alive(runtime) and not runtime.agent_socket.exists()
    with pytest.raises(HypervisorError, match="HTTP 500"):
        driver.counters(runtime)
    driver.boot(runtime)
    assert driver.info(runtime).state is VMState.RUNNING
    with driver.agent_connect(runtime, 5) as sock:
        assert _echo(sock) == b"ping\n"


def test_delete_vm_then_shutdown_vmm(
    driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Callable[..., VMSpec]
) -> None:
    driver.start(make_spec(), runtime)
    assert driver.ping(runtime)["version"]
    driver.delete_vm(runtime)
    info = driver.info(runtime)
    assert (info.state, info.detail) == (VMState.SHUTDOWN, {"vm": "not created"})
    driver.delete_vm(runtime)  # 204 even without a VM
    driver.shutdown_vmm(runtime)
    assert not driver.is_alive(runtime)
    assert not runtime.pidfile.exists() and not runtime.control_socket.exists()


# ------------------------------------------------------------------------------ resize


def test_resize_refuses_what_the_config_makes_impossible_without_asking(
    driver: CloudHypervisor,
    runtime: RuntimeDir,
    make_spec: Callable[..., VMSpec],
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = workdir / "requests.jsonl"
    monkeypatch.setenv("CHSIM_RECORD", str(record))
    driver.start(make_spec(max_vcpus=None, max_memory_mib=None), runtime)
    with pytest.raises(NotSupported, match="at most 1 vCPU"):
        driver.resize(runtime, vcpus=2)
    with pytest.raises(NotSupported, match="without max_memory_mib"):
        driver.resize(runtime, memory_mib=512)
    driver.resize(runtime, vcpus=1)  # already so: nothing to send
    assert "vm.resize" not in _records(record)


def test_memory_resize_grows_in_128_mib_steps_and_never_shrinks(
    driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Callable[..., VMSpec]
) -> None:
    driver.start(make_spec(memory_mib=256, max_memory_mib=1024), runtime)
    with pytest.raises(NotSupported, match="at most 1024 MiB"):
        driver.resize(runtime, memory_mib=2048)
    with pytest.raises(HypervisorError, match="multiples of 128 MiB"):
        driver.resize(runtime, memory_mib=300)
    driver.resize(runtime, memory_mib=512)
    assert driver.info(runtime).memory_mib == 512
    with pytest.raises(NotSupported, match="only grows"):
        driver.resize(runtime, memory_mib=384)


def test_the_balloon_takes_memory_back_through_vm_resize_and_gives_it_back(
    driver: CloudHypervisor,
    runtime: RuntimeDir,
    make_spec: Callable[..., VMSpec],
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = workdir / "requests.jsonl"
    monkeypatch.setenv("CHSIM_RECORD", str(record))
    driver.start(make_spec(memory_mib=256, max_memory_mib=None), runtime)
    assert driver.balloon_mib(runtime) == 256
    driver.balloon(runtime, 160)
    assert driver.balloon_mib(runtime) == 160
    driver.balloon(runtime, 256)
    assert driver.balloon_mib(runtime) == 256
    sent = [json.loads(line) for line in record.read_text().splitlines()]
    create = next(r for r in sent if r["path"].endswith("/vm.create"))
    assert json.loads(create["body"])["balloon"] == {
        "size": 0,
        "deflate_on_oom": False,
        "free_page_reporting": False,
    }
    resizes = [json.loads(r["body"]) for r in sent if r["path"].endswith("/vm.resize")]
    assert resizes == [{"desired_balloon": 96 << 20}, {"desired_balloon": 0}]


def test_a_vm_without_a_balloon_device_says_so(
    driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Callable[..., VMSpec]
) -> None:
    driver.start(make_spec(max_memory_mib=None).replace(balloon=False), runtime)
    assert driver.balloon_mib(runtime) is None
    with pytest.raises(NotSupported, match="without a balloon device"):
        driver.balloon(runtime, 128)


def test_vcpu_resize_during_a_pending_removal_is_resize_busy(
    driver: CloudHypervisor,
    runtime: RuntimeDir,
    make_spec: Callable[..., VMSpec],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHSIM_CPU_REMOVAL_DELAY", "30")
    driver.start(make_spec(vcpus=2, max_vcpus=4), runtime)
    driver.resize(runtime, vcpus=1)  # a removal: the guest must offline a vCPU first
    with pytest.raises(ResizeBusy, match="HTTP 429") as err:
        driver.resize(runtime, vcpus=3)
    assert isinstance(err.value.__cause__, ChApiError) and err.value.__cause__.status == 429
    driver.resize(runtime, memory_mib=384)  # memory is not held up by the vCPU removal
    with pytest.raises(NotSupported, match="at most 4 vCPU"):
        driver.resize(runtime, vcpus=5)


# -------------------------------------------------------------- hybrid vsock and serial


def test_vsock_handshake_answers_ok_with_a_host_port(
    driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Callable[..., VMSpec]
) -> None:
    driver.start(make_spec(), runtime)
    assert wait_for(lambda: Path(f"{runtime.agent_socket}.guest1024").exists(), 5)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(runtime.agent_socket))
        sock.sendall(b"connect 1024\n")  # case-insensitive
        reply = _read_until(sock, b"\n")
        word, port = reply.decode().split()
        assert word == "OK" and 2**30 <= int(port) < 2**31 and int(port) != 1024
        assert _echo(sock, b"raw bytes after OK") == b"raw bytes after OK"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(runtime.agent_socket))
        sock.sendall(b"CONNECT 4242\n")  # nobody listens on that guest port
        assert sock.recv(64) == b""


def test_agent_connect_retries_until_the_guest_listens(
    driver: CloudHypervisor,
    runtime: RuntimeDir,
    make_spec: Callable[..., VMSpec],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHSIM_AGENT_DELAY", "1.0")
    driver.start(make_spec(), runtime)
    started = time.monotonic()
    with driver.agent_connect(runtime, 10) as sock:
        waited = time.monotonic() - started
        assert sock.gettimeout() is None
        assert _echo(sock) == b"ping\n"
    assert 0.5 < waited < 5


def test_agent_connect_gives_up_at_its_timeout_with_a_reason(
    driver: CloudHypervisor,
    runtime: RuntimeDir,
    make_spec: Callable[..., VMSpec],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHSIM_AGENT_DELAY", "60")
    driver.start(make_spec(), runtime)
    started = time.monotonic()
    with pytest.raises(HypervisorError, match="vsock port 1024 within 0.5s.*closed by the VMM"):
        driver.agent_connect(runtime, 0.5)
    assert time.monotonic() - started < 2


def test_serial_socket_echoes_replays_and_takes_one_client_at_a_time(
    driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Callable[..., VMSpec]
) -> None:
    driver.start(make_spec(), runtime)
    with _serial(runtime) as first:
        assert b"login: " in _read_until(first, b"login: ")  # boot output replayed
        first.sendall(b"root\r")
        assert b"root\r\n" in _read_until(first, b"root\r\n")
        with _serial(runtime) as second:
            assert b"root\r\n" in _read_until(second, b"root\r\n")
            first.settimeout(5)
            assert first.recv(4096) == b""  # the newcomer disconnected the old client


# ---------------------------------------------------------------- crash and restore


def test_after_sigkill_sockets_are_stale_and_a_new_start_clears_them(
    driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Callable[..., VMSpec]
) -> None:
    pid = driver.start(make_spec(), runtime)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not driver.is_alive(runtime), 5)
    assert runtime.agent_socket.exists() and runtime.serial_socket.exists()  # left behind
    assert driver.info(runtime).state is VMState.DEAD
    driver.start(make_spec(), runtime)
    assert driver.info(runtime).state is VMState.RUNNING


def test_restore_refuses_a_disk_another_vmm_holds(
    driver: CloudHypervisor,
    runtimes: Callable[..., RuntimeDir],
    make_spec: Callable[..., VMSpec],
    workdir: Path,
) -> None:
    source = runtimes("src")
    spec = make_spec()
    driver.start(spec, source)
    snap = workdir / "s"
    snap.mkdir()
    files = driver.snapshot(source, snap)
    before = spec.disks[1].path.read_bytes()
    with pytest.raises(HypervisorError, match="in use by another VMM"):
        driver.restore(spec, runtimes("dst"), files)  # same data disk: the paused source holds it
    assert spec.disks[1].path.read_bytes() == before
    assert driver.info(source).state is VMState.PAUSED


def test_restore_refuses_foreign_or_mismatched_snapshots(
    driver: CloudHypervisor,
    runtimes: Callable[..., RuntimeDir],
    make_spec: Callable[..., VMSpec],
    workdir: Path,
) -> None:
    source = runtimes("src")
    spec = make_spec()
    driver.start(spec, source)
    snap = workdir / "s"
    snap.mkdir()
    files = driver.snapshot(source, snap)
    driver.destroy(source)
    target = runtimes("dst")
    with pytest.raises(HypervisorError, match=r"2 disk\(s\) but the spec gives 1"):
        driver.restore(spec.replace(disks=spec.disks[:1]), target, files)
    (snap / SNAPSHOT_META).unlink()
    with pytest.raises(HypervisorError, match="not a snapshot taken by this driver"):
        driver.restore(spec, target, SnapshotFiles(snap, files.files))
    assert not driver.is_alive(target)


def test_destroy_leaves_nothing_behind(
    driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Callable[..., VMSpec]
) -> None:
    pid = driver.start(make_spec(), runtime)
    driver.destroy(runtime)
    assert not runtime.root.exists()
    assert not Path(f"/proc/{pid}").exists()
    driver.destroy(runtime)  # idempotent
