"""Contract tests: every request the Cloud Hypervisor driver can send conforms to the v53 OpenAPI
document, as amended by ``cloud-hypervisor-notes.md`` where the released server differs.

Two layers:
- the endpoint table (``chapi.ENDPOINTS``, the only way the driver reaches the server) against
  the spec: path, method, body schema and success codes;
- the requests themselves, captured on the wire while the driver's public methods run against
  the simulator (``CHSIM_RECORD``), each validated here against the spec, independently of the
  simulator's own validation. ``SCENARIOS`` must name a driver call for every endpoint in the
  table: an endpoint added without a contract test fails ``test_every_endpoint_has_a_scenario``.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns

from tests.chsim.spec import OpenApi
from vms.hypervisors.base import (
    DiskSpec,
    HypervisorError,
    NetSpec,
    NotSupported,
    RuntimeDir,
    SnapshotFiles,
    VMSpec,
)
from vms.hypervisors.chapi import API_PREFIX, ENDPOINTS, ChApi
from vms.hypervisors.cloud_hypervisor import CloudHypervisor, MiB, build_vm_config, net_config
from vms.network import tap

# Where the released server's success code differs from the spec's (notes §1, §2).
KNOWN_DEVIATIONS = {("vmm.shutdown", 200)}


# ----------------------------------------------------------------------- the endpoint table


@pytest.mark.parametrize("name", sorted(ENDPOINTS))
def test_endpoint_exists_in_spec_with_method_and_body_schema(openapi: OpenApi, name: str) -> None:
    endpoint = ENDPOINTS[name]
    assert endpoint.path == f"{API_PREFIX}/{name}"
    assert openapi.base_path == API_PREFIX  # servers[0].url ends with the same prefix
    op = openapi.lookup(endpoint.method, f"/{name}")
    assert op is not None, f"{endpoint.method} /{name} is not in the OpenAPI document"
    assert op.body_schema == endpoint.body_schema
    if op.body_schema is not None:
        assert op.body_required


@pytest.mark.parametrize("name", sorted(ENDPOINTS))
def test_endpoint_success_codes_match_spec_or_notes(openapi: OpenApi, name: str) -> None:
    endpoint = ENDPOINTS[name]
    op = openapi.lookup(endpoint.method, f"/{name}")
    assert op is not None
    spec_success = {int(code) for code in op.responses if code.startswith("2")}
    # Every success the spec documents is accepted...
    assert spec_success <= endpoint.success
    # ...and anything beyond it is a deviation the notes document for the released server.
    for code in endpoint.success - spec_success:
        assert (name, code) in KNOWN_DEVIATIONS, f"{name} accepts undocumented {code}"


def test_spec_servers_url_has_the_api_prefix(openapi: OpenApi) -> None:
    assert openapi.doc["servers"][0]["url"].endswith(API_PREFIX)


# ------------------------------------------------------------------- VmConfig from VMSpec


def _uefi_spec(tmp: Path) -> VMSpec:
    return VMSpec(
        vm_id="win",
        boot="uefi",
        vcpus=2,
        memory_mib=4096,
        firmware_code=tmp / "CLOUDHV.fd",
        firmware_vars=tmp / "vars.fd",
        disks=(DiskSpec(path=tmp / "win.raw"),),
        nets=(NetSpec(tap="tapw0", mac="52:54:00:00:00:01"),),
    )


SPECS: dict[str, Callable[[Path], VMSpec]] = {
    "linux-minimal": lambda tmp: VMSpec(vm_id="a", kernel=tmp / "vmlinuz"),
    "linux-full": lambda tmp: VMSpec(
        vm_id="b",
        vcpus=2,
        max_vcpus=4,
        memory_mib=256,
        max_memory_mib=1024,
        kernel=tmp / "vmlinuz",
        initramfs=tmp / "initrd",
        cmdline="console=ttyS0 root=/dev/vda rw",
        disks=(
            DiskSpec(path=tmp / "root.raw", readonly=True, id="root"),
            DiskSpec(path=tmp / "data.qcow2", format="qcow2"),
        ),
        nets=(
            NetSpec(tap="tap0", mac="52:54:00:00:00:02"),
            NetSpec(tap="tap1", mac="52:54:00:00:00:03", id="lan"),
        ),
    ),
    "uefi-windows": _uefi_spec,
}


@pytest.fixture
def rt(tmp_path: Path) -> RuntimeDir:
    return RuntimeDir(tmp_path / "rt")


@pytest.mark.parametrize("variant", sorted(SPECS))
def test_vm_config_validates_against_spec_without_unknown_fields(
    openapi: OpenApi, tmp_path: Path, rt: RuntimeDir, variant: str
) -> None:
    config = build_vm_config(SPECS[variant](tmp_path), rt)
    assert openapi.errors("VmConfig", config) == []
    assert openapi.unknown_fields("VmConfig", config) == []


def test_net_entries_carry_no_ip_or_mask_despite_stale_spec_defaults(
    openapi: OpenApi, tmp_path: Path, rt: RuntimeDir
) -> None:
    net_schema = openapi.schemas()["NetConfig"]["properties"]
    # The spec still advertises these defaults (stale since v49, notes §3)...
    assert net_schema["ip"].get("default") == "192.168.249.1"
    assert net_schema["mask"].get("default") == "255.255.255.0"
    config = build_vm_config(SPECS["linux-full"](tmp_path), rt)
    # ...so nothing may rely on them: we send tap and mac only (no host-side IP setup).
    for net in config["net"]:
        assert set(net) == {"tap", "mac", "id"}
    assert [n["id"] for n in config["net"]] == ["net0", "lan"]


def test_disks_name_their_image_type_and_qcow2_follows_backing_files(
    tmp_path: Path, rt: RuntimeDir
) -> None:
    disks = build_vm_config(SPECS["linux-full"](tmp_path), rt)["disks"]
    assert [(d["image_type"], d["readonly"], d["id"]) for d in disks] == [
        ("Raw", True, "root"),
        ("Qcow2", False, "disk1"),
    ]
    assert "backing_files" not in disks[0]
    assert disks[1]["backing_files"] is True


def test_console_is_off_and_serial_is_the_runtime_socket(tmp_path: Path, rt: RuntimeDir) -> None:
    config = build_vm_config(SPECS["linux-minimal"](tmp_path), rt)
    assert config["console"] == {"mode": "Off"}  # the default (Tty) writes into vmm.log
    assert config["serial"] == {"mode": "Socket", "socket": str(rt.serial_socket)}


def test_vsock_uses_a_guest_cid_and_the_agent_socket(tmp_path: Path, rt: RuntimeDir) -> None:
    config = build_vm_config(SPECS["linux-minimal"](tmp_path), rt)
    assert config["vsock"]["cid"] >= 3
    assert config["vsock"]["socket"] == str(rt.agent_socket)
    assert config["rng"] == {"src": "/dev/urandom"}


def test_cpus_and_memory_hotplug_come_from_max_values(tmp_path: Path, rt: RuntimeDir) -> None:
    config = build_vm_config(SPECS["linux-full"](tmp_path), rt)
    assert config["cpus"] == {"boot_vcpus": 2, "max_vcpus": 4}
    assert config["memory"] == {
        "size": 256 * MiB,
        "hotplug_size": 768 * MiB,
        "hotplug_method": "Acpi",
    }
    minimal = build_vm_config(SPECS["linux-minimal"](tmp_path), rt)
    assert minimal["cpus"] == {"boot_vcpus": 1, "max_vcpus": 1}
    assert minimal["memory"] == {"size": 256 * MiB}


def test_payload_is_kernel_or_firmware_never_both(tmp_path: Path, rt: RuntimeDir) -> None:
    linux = build_vm_config(SPECS["linux-full"](tmp_path), rt)["payload"]
    assert linux == {
        "kernel": str(tmp_path / "vmlinuz"),
        "initramfs": str(tmp_path / "initrd"),
        "cmdline": "console=ttyS0 root=/dev/vda rw",
    }
    uefi = build_vm_config(_uefi_spec(tmp_path), rt)
    assert uefi["payload"] == {"firmware": str(tmp_path / "CLOUDHV.fd")}
    assert uefi["cpus"]["kvm_hyperv"] is True  # Windows needs it (notes §9)


def test_spec_bug_generic_vhost_user_key_is_never_sent(tmp_path: Path, rt: RuntimeDir) -> None:
    for make in SPECS.values():
        config = build_vm_config(make(tmp_path), rt)
        assert "generic-vhost-user" not in config and "generic_vhost_user" not in config


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kernel": None}, "needs a kernel"),
        ({"max_vcpus": 1, "vcpus": 2}, "below vcpus"),
        ({"max_memory_mib": 128}, "below memory_mib"),
        ({"boot": "uefi"}, "firmware_code"),
        ({"extra": {"ch.kvm_hyperv": "maybe"}}, "on or off"),
    ],
)
def test_impossible_specs_are_refused_before_any_request(
    tmp_path: Path, rt: RuntimeDir, changes: dict[str, Any], message: str
) -> None:
    spec = SPECS["linux-full"](tmp_path).replace(**changes)
    with pytest.raises(HypervisorError, match=message):
        build_vm_config(spec, rt)


# ----------------------------------------------------- requests on the wire, per endpoint


def _start(driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Callable[..., VMSpec]) -> None:
    driver.start(make_spec(), runtime)


def _snapshot(driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Any, work: Path) -> Path:
    _start(driver, runtime, make_spec)
    snap = work / "snap"
    snap.mkdir()
    driver.snapshot(runtime, snap)
    return snap


def _restore(driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Any, work: Path) -> None:
    snap = _snapshot(driver, runtime, make_spec, work)
    files = tuple(sorted(snap.iterdir()))
    driver.stop_hard(runtime)
    driver.restore(make_spec(), runtime, SnapshotFiles(snap, files))


_TAP_NS = f"chtap-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module", autouse=True)
def _tap_namespace() -> Iterator[None]:
    """A namespace for the TAPs whose descriptors the driver passes (removed at the end)."""
    netns.create(_TAP_NS)
    yield
    netns.remove(_TAP_NS)


def _fd_nic(ifname: str, mac: str, **kw: Any) -> NetSpec:
    tap.create(_TAP_NS, ifname)
    return NetSpec(ifname, mac, fd=tap.open_fd(_TAP_NS, ifname), netns=_TAP_NS, **kw)


def _start_with_tap_fd(
    driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Any, work: Path
) -> None:
    net = _fd_nic(f"tch{uuid.uuid4().hex[:6]}", "52:54:00:12:34:57", id="lan")
    try:
        driver.start(make_spec(nets=(net,)), runtime)
    finally:
        assert net.fd is not None
        os.close(net.fd)


def _then(*steps: Callable[[CloudHypervisor, RuntimeDir], object]) -> Any:
    def scenario(driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Any, work: Path) -> None:
        _start(driver, runtime, make_spec)
        for step in steps:
            step(driver, runtime)

    return scenario


SCENARIOS: dict[str, Any] = {
    "vmm.ping": _then(lambda d, r: d.ping(r)),
    "vmm.shutdown": _then(lambda d, r: d.shutdown_vmm(r)),
    "vm.create": _then(),
    "vm.boot": _then(lambda d, r: d.shutdown_vm(r), lambda d, r: d.boot(r)),
    "vm.shutdown": _then(lambda d, r: d.shutdown_vm(r)),
    "vm.reboot": _then(lambda d, r: d.reboot(r)),
    "vm.power-button": _then(lambda d, r: d.power_button(r)),
    "vm.pause": _then(lambda d, r: d.pause(r)),
    "vm.resume": _then(lambda d, r: d.pause(r), lambda d, r: d.resume(r)),
    "vm.delete": _then(lambda d, r: d.delete_vm(r)),
    "vm.snapshot": _snapshot,
    "vm.restore": _restore,
    "vm.resize": _then(lambda d, r: d.resize(r, vcpus=2, memory_mib=384)),
    "vm.info": _then(lambda d, r: d.info(r)),
    "vm.counters": _then(lambda d, r: d.counters(r)),
    "vm.add-net": _start_with_tap_fd,
}


def test_every_endpoint_has_a_scenario() -> None:
    assert set(SCENARIOS) == set(ENDPOINTS)


def _check_request(openapi: OpenApi, record: dict[str, Any]) -> str:
    """Validate one captured request against the spec; return its endpoint name."""
    method, path = record["method"], record["path"]
    assert path.startswith(API_PREFIX + "/"), path
    route = path[len(API_PREFIX) :]
    op = openapi.lookup(method, route)
    assert op is not None, f"{method} {route} is not in the spec"
    name = route.lstrip("/")
    assert name in ENDPOINTS, f"{name} was sent but is not in the driver's endpoint table"
    headers, body = record["headers"], record["body"]
    if op.body_schema is None:
        # Body-less actions reject any body, even {} (notes §1).
        assert body == ""
        if method == "PUT":
            assert headers.get("content-length") == "0"
    else:
        assert headers.get("content-type") == "application/json"
        assert headers.get("content-length") == str(len(body.encode()))
        assert "chunked" not in headers.get("transfer-encoding", "")
        parsed = json.loads(body)
        assert openapi.errors(op.body_schema, parsed) == [], f"{name}: {parsed}"
        assert openapi.unknown_fields(op.body_schema, parsed) == [], f"{name}: {parsed}"
    return name


@pytest.mark.parametrize("name", sorted(ENDPOINTS))
def test_driver_requests_on_the_wire_validate_against_spec(
    openapi: OpenApi,
    driver: CloudHypervisor,
    runtime: RuntimeDir,
    make_spec: Any,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
) -> None:
    record = workdir / "requests.jsonl"
    monkeypatch.setenv("CHSIM_RECORD", str(record))
    SCENARIOS[name](driver, runtime, make_spec, workdir)
    sent = [json.loads(line) for line in record.read_text().splitlines()]
    names = [_check_request(openapi, r) for r in sent]
    assert name in names, f"the scenario for {name} never sent it: {names}"


def test_direct_client_refuses_unlisted_endpoints_and_wrong_bodies(tmp_path: Path) -> None:
    api = ChApi(tmp_path / "nothing.sock")
    with pytest.raises(KeyError):
        api.call("vm.add-disk", {"path": "/x"})
    with pytest.raises(TypeError):
        api.call("vm.pause", {})
    with pytest.raises(TypeError):
        api.call("vm.resize")


# ------------------------------------------------------------- NICs backed by TAP descriptors


def test_a_tap_descriptor_nic_is_cold_added_with_scm_rights_before_boot(
    driver: CloudHypervisor,
    runtime: RuntimeDir,
    make_spec: Any,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = workdir / "requests.jsonl"
    monkeypatch.setenv("CHSIM_RECORD", str(record))
    _start_with_tap_fd(driver, runtime, make_spec, workdir)
    sent = [json.loads(line) for line in record.read_text().splitlines()]
    names = [r["path"].rsplit("/", 1)[1] for r in sent]
    assert names.index("vm.create") < names.index("vm.add-net") < names.index("vm.boot")
    create = json.loads(sent[names.index("vm.create")]["body"])
    assert "net" not in create  # vm.create takes no descriptors
    add = sent[names.index("vm.add-net")]
    assert json.loads(add["body"]) == {"mac": "52:54:00:12:34:57", "id": "lan"}
    assert add["fds"] == 1
    assert all(r["fds"] == 0 for r in sent if r is not add)
    # The VMM holds the NIC: it is in the booted VM's config.
    info = driver.info(runtime)
    assert info.state.value == "running"
    nets = ChApi(runtime.control_socket).info()["config"]["net"]
    assert [(n["id"], n["mac"], n["num_queues"]) for n in nets] == [("lan", "52:54:00:12:34:57", 2)]


def test_net_config_names_the_tap_only_without_a_descriptor(openapi: OpenApi) -> None:
    by_name = net_config(NetSpec("tap0", "52:54:00:00:00:0A"), 0)
    by_fd = net_config(NetSpec("tap0", "52:54:00:00:00:0b", fd=5, id="lan"), 1)
    assert by_name == {"tap": "tap0", "mac": "52:54:00:00:00:0a", "id": "net0"}
    assert by_fd == {"mac": "52:54:00:00:00:0b", "id": "lan"}
    for body in (by_name, by_fd):
        assert openapi.errors("NetConfig", body) == []
        assert openapi.unknown_fields("NetConfig", body) == []


def test_a_descriptor_that_is_not_a_tap_fails_the_start(
    driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Any
) -> None:
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        with pytest.raises(HypervisorError, match="tap"):
            driver.start(make_spec(nets=(NetSpec("tapx", "52:54:00:00:00:0c", fd=fd),)), runtime)
    finally:
        os.close(fd)


def test_restoring_with_tap_descriptors_is_refused_not_misrouted(
    driver: CloudHypervisor, runtime: RuntimeDir, make_spec: Any, workdir: Path
) -> None:
    net = NetSpec("tapy", "52:54:00:00:00:0d", fd=5)
    with pytest.raises(NotSupported, match="net_fds"):
        driver.restore(make_spec(nets=(net,)), runtime, SnapshotFiles(workdir, ()))
