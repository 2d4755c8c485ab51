"""The simulator answers as the notes say the released v53 server does.

These pin the simulator itself, request by request, so that the driver's flow tests rest on a
model that is checked against ``cloud-hypervisor-notes.md`` and the OpenAPI document.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chsim.spec import OpenApi
from vms.hypervisors.base import RuntimeDir, VMSpec
from vms.hypervisors.chapi import ChApi, ChApiError, UnixHTTPConnection
from vms.hypervisors.cloud_hypervisor import CloudHypervisor, build_vm_config
from vms.hypervisors.process import wait_for


class BareVmm:
    """A simulator process with no VM, as ``cloud-hypervisor --api-socket`` starts."""

    def __init__(self, binary: Path, socket_path: Path) -> None:
        self.socket = socket_path
        self.proc = subprocess.Popen(
            [str(binary), "--api-socket", f"path={socket_path}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.api = ChApi(socket_path, timeout=5)
        assert wait_for(self._up, 15), "simulator did not start"

    def _up(self) -> bool:
        try:
            self.api.ping()
        except Exception:  # noqa: BLE001 - not up yet
            return False
        return True

    def raw(
        self,
        method: str,
        name: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = UnixHTTPConnection(self.socket, 5)
        try:
            conn.request(method, f"/api/v1/{name}", body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def bare(fake_ch: Path, runtime: RuntimeDir) -> Iterator[BareVmm]:
    runtime.create()
    vmm = BareVmm(fake_ch, runtime.control_socket)
    yield vmm
    vmm.stop()


@pytest.fixture
def config(runtime: RuntimeDir, make_spec: Callable[..., VMSpec]) -> dict[str, Any]:
    return build_vm_config(make_spec(), runtime)


def test_wrong_method_is_400_and_unknown_path_404(bare: BareVmm) -> None:
    assert bare.raw("GET", "vm.pause")[0] == 400
    assert bare.raw("PUT", "vm.info")[0] == 400
    status, headers, body = bare.raw("PUT", "vm.no-such-endpoint")
    assert status == 404
    assert headers["content-type"] == "application/json"
    assert headers["server"] == "Cloud Hypervisor API"


def test_an_action_with_a_body_is_400_even_an_empty_object(bare: BareVmm) -> None:
    status, _, body = bare.raw("PUT", "vm.delete", b"{}", {"Content-Type": "application/json"})
    assert status == 400
    assert isinstance(json.loads(body), list)
    assert bare.raw("PUT", "vm.delete", None, {"Content-Length": "0"})[0] == 204


def test_chunked_bodies_get_micro_http_error_object(bare: BareVmm) -> None:
    conn = UnixHTTPConnection(bare.socket, 5)
    try:
        conn.request(
            "PUT",
            "/api/v1/vm.resize",
            body=iter([b'{"desired_vcpus": 2}']),
            encode_chunked=True,
            headers={"Transfer-Encoding": "chunked"},
        )
        resp = conn.getresponse()
        assert resp.status == 400
        assert "error" in json.loads(resp.read())
    finally:
        conn.close()


def test_bodies_are_validated_against_the_spec(bare: BareVmm, config: dict[str, Any]) -> None:
    bad = {**config, "vsock": {"cid": 2, "socket": "/tmp/x"}}
    status, _, body = bare.raw("PUT", "vm.create", json.dumps(bad).encode())
    assert status == 400
    messages = json.loads(body)
    assert any("less than the minimum of 3" in m for m in messages)


def test_unknown_fields_are_silently_ignored(bare: BareVmm, config: dict[str, Any]) -> None:
    typo = {**config, "disks": [{**config["disks"][0], "image-type": "Raw"}]}
    bare.api.call("vm.create", typo)
    assert bare.api.info()["state"] == "Created"


def test_without_a_vm_actions_are_404_and_delete_204(bare: BareVmm) -> None:
    for name in ("vm.boot", "vm.pause", "vm.resume", "vm.shutdown", "vm.reboot"):
        with pytest.raises(ChApiError) as err:
            bare.api.call(name)
        assert err.value.status == 404, name
    with pytest.raises(ChApiError, match="HTTP 404"):
        bare.api.info()
    bare.api.call("vm.delete")


def test_config_is_checked_at_boot_not_at_create(
    bare: BareVmm, config: dict[str, Any], workdir: Path
) -> None:
    broken = {**config, "payload": {"kernel": str(workdir / "absent")}}
    bare.api.call("vm.create", broken)  # accepted: create only stores the config
    with pytest.raises(ChApiError, match="Cannot open kernel") as err:
        bare.api.call("vm.boot")
    assert err.value.status == 500
    with pytest.raises(ChApiError, match="already created"):
        bare.api.call("vm.create", config)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"console": {"mode": "Socket", "socket": "/tmp/c.sock"}}, "does not support socket"),
        ({"net": [{"tap": "t0", "ip": "192.168.249.1", "mask": "255.255.255.0"}]}, "tap"),
        ({"cpus": {"boot_vcpus": 3, "max_vcpus": 2}}, "lower than boot"),
    ],
)
def test_boot_refuses_what_the_released_server_refuses(
    bare: BareVmm, config: dict[str, Any], change: dict[str, Any], message: str
) -> None:
    bare.api.call("vm.create", {**config, **change})
    with pytest.raises(ChApiError, match=message):
        bare.api.call("vm.boot")


def test_responses_validate_against_the_spec(
    openapi: OpenApi, bare: BareVmm, config: dict[str, Any]
) -> None:
    assert openapi.errors("VmmPingResponse", bare.api.ping()) == []
    bare.api.call("vm.create", config)
    bare.api.call("vm.boot")
    info = bare.api.info()
    assert openapi.errors("VmInfo", info) == []
    assert set(info) == {"config", "state", "memory_actual_size", "device_tree"}
    assert info["config"]["console"] == {"mode": "Off"}
    counters = bare.api.counters()
    assert openapi.errors("VmCounters", counters) == []
    assert set(counters["data"]) >= {"read_bytes", "write_bytes", "read_ops", "write_ops"}
    assert set(counters["net0"]) == {"rx_bytes", "rx_frames", "tx_bytes", "tx_frames"}


def test_create_binds_the_serial_socket(
    bare: BareVmm, config: dict[str, Any], runtime: RuntimeDir
) -> None:
    bare.api.call("vm.create", config)
    assert runtime.serial_socket.exists() and not runtime.agent_socket.exists()
    bare.api.call("vm.boot")
    assert runtime.agent_socket.exists()


def test_vmm_shutdown_answers_200_with_no_body_and_exits(
    bare: BareVmm, config: dict[str, Any]
) -> None:
    bare.api.call("vm.create", config)
    status, _, body = bare.raw("PUT", "vmm.shutdown", None, {"Content-Length": "0"})
    assert (status, body) == (200, b"")
    bare.proc.wait(timeout=5)
    assert bare.proc.returncode == 0


def test_a_second_vmm_on_the_same_socket_fails(fake_ch: Path, bare: BareVmm) -> None:
    second = subprocess.run(
        [str(fake_ch), "--api-socket", f"path={bare.socket}"],
        capture_output=True,
        timeout=30,
        text=True,
    )
    assert second.returncode != 0 and "in use" in second.stderr
    bare.api.ping()  # the first one is unharmed


def _snapshot_of_a_running_vm(
    driver: CloudHypervisor, make_spec: Callable[..., VMSpec], workdir: Path
) -> Path:
    source = RuntimeDir(workdir / "src")
    driver.start(make_spec(), source)
    snap = workdir / "snap"
    snap.mkdir()
    driver.snapshot(source, snap)
    driver.destroy(source)
    source.create()  # config.json names sockets in it: a raw restore binds them again there
    return snap


def test_restore_only_in_a_fresh_vmm_and_it_comes_back_paused(
    driver: CloudHypervisor,
    bare: BareVmm,
    make_spec: Callable[..., VMSpec],
    workdir: Path,
    config: dict[str, Any],
) -> None:
    snap = _snapshot_of_a_running_vm(driver, make_spec, workdir)
    assert sorted(p.name for p in snap.iterdir()) == [
        "config.json",
        "disk1-data.qcow2",
        "memory-ranges",
        "sandbox-snapshot.json",
        "state.json",
    ]
    bare.api.call("vm.restore", {"source_url": f"file://{snap}"})
    assert bare.api.info()["state"] == "Paused"
    with pytest.raises(ChApiError, match="already created") as err:
        bare.api.call("vm.restore", {"source_url": f"file://{snap}"})
    assert err.value.status == 500
    bare.api.call("vm.resume")
    assert bare.api.info()["state"] == "Running"
    with pytest.raises(ChApiError, match="Invalid transition"):
        bare.api.call("vm.resume")


def test_restore_fails_on_a_leftover_vsock_socket_and_drops_the_half_built_vm(
    driver: CloudHypervisor, fake_ch: Path, make_spec: Callable[..., VMSpec], workdir: Path
) -> None:
    snap = _snapshot_of_a_running_vm(driver, make_spec, workdir)
    saved = json.loads((snap / "config.json").read_text())
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(saved["vsock"]["socket"])  # what a SIGKILLed VMM leaves behind
    stale.close()
    vmm = BareVmm(fake_ch, workdir / "c.sock")
    try:
        with pytest.raises(ChApiError, match="Address already in use") as err:
            vmm.api.call("vm.restore", {"source_url": f"file://{snap}"})
        assert err.value.status == 500
        with pytest.raises(ChApiError, match="HTTP 404"):
            vmm.api.info()
    finally:
        vmm.stop()
        Path(saved["vsock"]["socket"]).unlink(missing_ok=True)


def test_ondemand_restore_cannot_prefault(bare: BareVmm, workdir: Path) -> None:
    with pytest.raises(ChApiError, match="prefault"):
        bare.api.call(
            "vm.restore",
            {
                "source_url": f"file://{workdir}",
                "prefault": True,
                "memory_restore_mode": "OnDemand",
            },
        )


def test_raw_http_client_sanity(bare: BareVmm) -> None:
    # http.client over the unix socket speaks HTTP/1.1 and reads a 204 without a body.
    conn = UnixHTTPConnection(bare.socket, 5)
    try:
        conn.request("PUT", "/api/v1/vm.delete", headers={"Content-Length": "0"})
        resp = conn.getresponse()
        assert (resp.status, resp.version, resp.read()) == (204, 11, b"")
    finally:
        conn.close()
    assert isinstance(conn, http.client.HTTPConnection)
