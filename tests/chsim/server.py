"""The simulated VMM: one VM's state machine behind CH's REST API on a unix socket.

Behaviour follows ``cloud-hypervisor-notes.md`` (the released v53 server), not the spec where the
two differ; each rule below names its source. Routes, methods and request schemas come from the
OpenAPI document itself, so an endpoint the spec lacks is a 404 here too.

- Transport (notes §1): PUT bodies need Content-Length (chunked is refused with micro_http's
  ``{"error": ...}`` object); an action endpoint with a body gets 400; wrong method 400; unknown
  path 404; every answer has ``Content-Type: application/json`` and ``Server: Cloud Hypervisor
  API``; requests are served one at a time.
- Status codes (notes §1, §2): 204 for actions, 200 for GETs, 200 with an empty body for
  ``vmm.shutdown``, 404 when no VM is created, 429 for a resize during a pending vCPU removal,
  500 for every other failure, including wrong-state errors the spec calls 405. Error bodies are
  arrays of strings, top error first.
- Bodies are validated against the spec's schema (400 when invalid); unknown fields are ignored
  and logged, as the server ignores them.
- Config is validated at vm.boot, not vm.create; vm.create binds the serial socket (notes §1).
- Snapshot (§4): VM must be paused; the directory must exist; config.json, state.json and
  memory-ranges are created with create-new. Restore only into a VMM without a VM; the vsock
  and serial sockets are bound afresh (a leftover file fails the restore); the VM comes back
  Paused unless ``resume`` is true.
- Resize (§10): vCPUs up to max_vcpus, removal stays pending for a while (429 meanwhile); memory
  needs hotplug_size, grows live in 128 MiB steps, never beyond size + hotplug_size.
- Descriptors (notes §3, CH's http_endpoint.rs): SCM_RIGHTS data that comes with a request is
  handed to it; only ``vm.add-net`` takes any (one TAP per queue pair: ``num_queues`` must be
  twice their number, and each must be a TAP opened with vnet headers); elsewhere they are
  closed. A NIC added before ``vm.boot`` answers 204 and joins the config.
- Guest: power-button makes the guest power off after a moment, and then the VMM process exits
  (no ``--no-shutdown``); reboot stays in the process; SIGTERM exits cleanly (vsock socket
  removed); SIGKILL leaves the socket files behind.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import os
import random
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from . import devices
from .devices import Gate, GuestService, SerialPort, VsockMuxer, log
from .spec import OpenApi, load

MiB = 1 << 20
HOTPLUG_ALIGN = 128 * MiB
VERSION = "v53.0"
AGENT_PORT = 1024


class ApiError(Exception):
    def __init__(self, status: int, *messages: str) -> None:
        super().__init__(": ".join(messages))
        self.status = status
        self.messages = list(messages)


def failed(action: str, *cause: str) -> ApiError:
    """A 500 with CH's error chain: the API layer, the action, then the root cause."""
    return ApiError(500, "Error from API", action, *cause)


def not_created(action: str) -> ApiError:
    return ApiError(404, "Error from API", action, "VM is not created")


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """Fill what the server's serde defaults fill, so vm.info reads like the real one."""
    cfg = copy.deepcopy(config)
    cpus = cfg.setdefault("cpus", {"boot_vcpus": 1, "max_vcpus": 1})
    cpus.setdefault("kvm_hyperv", False)
    cpus.setdefault("max_phys_bits", 46)
    cpus.setdefault("nested", True)
    mem = cfg.setdefault("memory", {"size": 512 * MiB})
    for key, value in (
        ("mergeable", False),
        ("hotplug_method", "Acpi"),
        ("shared", False),
        ("hugepages", False),
        ("prefault", False),
        ("thp", True),
    ):
        mem.setdefault(key, value)
    for index, disk in enumerate(cfg.get("disks") or []):
        disk.setdefault("id", f"_disk{index}")
        for key, value in (("readonly", False), ("direct", False), ("num_queues", 1)):
            disk.setdefault(key, value)
        disk.setdefault("queue_size", 128)
    for index, net in enumerate(cfg.get("net") or []):
        net.setdefault("id", f"_net{index}")
        net.setdefault("mac", "52:54:00:" + random.randbytes(3).hex(":"))
        net.setdefault("num_queues", 2)
        net.setdefault("queue_size", 256)
    cfg.setdefault("rng", {"src": "/dev/urandom"})
    cfg.setdefault("serial", {"mode": "Null"})
    cfg.setdefault("console", {"mode": "Tty"})  # the default a daemon must override
    if cfg.get("vsock"):
        cfg["vsock"].setdefault("id", "_vsock0")
    for key in ("iommu", "watchdog", "pvpanic"):
        cfg.setdefault(key, False)
    return cfg


class Vmm:
    """At most one VM, as in one ``cloud-hypervisor`` process."""

    def __init__(self, spec: OpenApi, *, no_shutdown: bool = False) -> None:
        self.spec = spec
        self.no_shutdown = no_shutdown
        self.lock = threading.RLock()
        self.exiting = threading.Event()
        self.config: dict[str, Any] | None = None
        self.state: str | None = None  # Created, Running, Paused, Shutdown
        self.gate = Gate()
        self.serial: SerialPort | None = None
        self.vsock: VsockMuxer | None = None
        self.guest: GuestService | None = None
        self.disk_fds: list[int] = []
        self.net_fds: dict[str, list[int]] = {}  # NIC id -> TAP descriptors the VMM holds
        self.request_fds: list[int] = []  # SCM_RIGHTS of the request being handled
        self.boot_id = ""
        self.running_since: float | None = None
        self.running_total = 0.0
        self.removal_pending_until = 0.0
        self.record = os.environ.get("CHSIM_RECORD")
        self.agent_delay = float(os.environ.get("CHSIM_AGENT_DELAY", "0.3"))
        self.removal_delay = float(os.environ.get("CHSIM_CPU_REMOVAL_DELAY", "0.5"))
        self.poweroff_delay = float(os.environ.get("CHSIM_POWEROFF_DELAY", "0.2"))
        agent = os.environ.get("CHSIM_GUEST_AGENT")
        self.agent_command: list[str] | None = json.loads(agent) if agent else None

    # ---------------------------------------------------------------- HTTP entry point

    def handle(
        self,
        method: str,
        raw_path: str,
        body: bytes,
        headers: dict[str, str],
        fds: list[int] | None = None,
    ) -> tuple[int, bytes | None]:
        self.request_fds = list(fds or [])
        try:
            return self._handle(method, raw_path, body, headers)
        finally:
            for fd in self.request_fds:  # whatever the endpoint did not take
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.request_fds = []

    def _handle(
        self, method: str, raw_path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes | None]:
        if self.record:
            with open(self.record, "a") as fh:
                fh.write(
                    json.dumps(
                        {
                            "method": method,
                            "path": raw_path,
                            "headers": headers,
                            "body": body.decode(errors="replace"),
                            "fds": len(self.request_fds),
                        }
                    )
                    + "\n"
                )
        try:
            status, payload = self._route(method, raw_path, body)
        except ApiError as exc:
            log(f"{method} {raw_path} -> {exc.status} {exc.messages}")
            return exc.status, json.dumps(exc.messages).encode()
        if payload is None:
            return status, None
        return status, json.dumps(payload).encode()

    def _route(self, method: str, raw_path: str, body: bytes) -> tuple[int, Any]:
        path = raw_path.split("?", 1)[0]
        if not path.startswith(self.spec.base_path + "/"):
            raise ApiError(404, "Not Found")
        route = path[len(self.spec.base_path) :]
        if route not in self.spec.routes():
            raise ApiError(404, "Not Found")
        op = self.spec.lookup(method, route)
        if op is None:
            raise ApiError(400, f"Method {method} not allowed for {route}")
        parsed: Any = None
        if op.body_schema is None:
            if method == "PUT" and body:
                raise ApiError(400, "Error from API", "Unexpected request body")
        else:
            if not body:
                raise ApiError(400, "Error from API", "Missing request body")
            try:
                parsed = json.loads(body)
            except ValueError as exc:
                raise ApiError(400, "Error from API", f"Invalid JSON: {exc}") from exc
            errors = self.spec.errors(op.body_schema, parsed)
            if errors:
                raise ApiError(400, "Error from API", f"Invalid {op.body_schema}", *errors)
            for field in self.spec.unknown_fields(op.body_schema, parsed):
                log(f"warning: unknown field {field} ignored")
        handler = getattr(self, "op_" + op.name.replace(".", "_").replace("-", "_"), None)
        if handler is None:
            raise failed(f"Error in {op.name}", "chsim: this endpoint is not modelled")
        with self.lock:
            result = handler(parsed)
        if result is None:
            return 204, None
        return result

    # ---------------------------------------------------------------------- helpers

    def _require_vm(self, action: str) -> dict[str, Any]:
        if self.config is None:
            raise not_created(action)
        return self.config

    def _set_running(self, running: bool) -> None:
        now = time.monotonic()
        if self.running_since is not None:
            self.running_total += now - self.running_since
            self.running_since = None
        if running:
            self.running_since = now

    def _guest_port(self, port: int) -> str | None:
        if port != AGENT_PORT or self.vsock is None:
            return None
        return devices.guest_listen_path(self.vsock.path, port)

    def _serial_out(self, text: str) -> None:
        if self.serial is not None:
            self.serial.write(text.encode())

    def _check_bootable(self, cfg: dict[str, Any]) -> None:
        """What CH checks only at boot (vm.create accepts anything that parses)."""
        action = "Error booting VM"
        payload = cfg["payload"]
        if ("kernel" in payload) == ("firmware" in payload):
            raise failed(action, "Exactly one of kernel or firmware must be given in payload")
        for key in ("kernel", "firmware", "initramfs"):
            if key in payload and not os.access(payload[key], os.R_OK):
                raise failed(action, f"Cannot open {key} {payload[key]}: No such file")
        cpus = cfg["cpus"]
        if cpus["boot_vcpus"] > cpus["max_vcpus"]:
            raise failed(action, "Max vCPUs lower than boot vCPUs")
        if cfg["console"].get("mode") == "Socket":
            raise failed(action, "virtio-console does not support socket mode")
        for net in cfg.get("net") or []:
            if "ip" in net or "mask" in net:
                # Setting a host address on the tap needs CAP_NET_ADMIN, which the VMM lacks.
                raise failed(action, "Error creating tap: Operation not permitted (os error 1)")
        for disk in cfg.get("disks") or []:
            if not os.path.exists(disk.get("path", "")):
                raise failed(action, f"Failed to open disk image {disk.get('path')}")
            if "image_type" not in disk:
                log("warning: disk image type autodetection is deprecated; set image_type")

    def _bring_up(self, action: str) -> None:
        """Create the devices of a booted or restored VM: disk locks and the vsock socket."""
        cfg = self._require_vm(action)
        try:
            for disk in cfg.get("disks") or []:
                fd = os.open(disk["path"], os.O_RDONLY if disk.get("readonly") else os.O_RDWR)
                self.disk_fds.append(fd)
                mode = fcntl.LOCK_SH if disk.get("readonly") else fcntl.LOCK_EX
                fcntl.lockf(fd, mode | fcntl.LOCK_NB)
            if cfg.get("vsock"):
                self.vsock = VsockMuxer(cfg["vsock"]["socket"], self.gate, self._guest_port)
                self.guest = GuestService(
                    devices.guest_listen_path(cfg["vsock"]["socket"], AGENT_PORT),
                    self.agent_command,
                )
        except OSError as exc:
            self._tear_down()
            raise failed(
                action, f"Error creating devices: {exc.strerror} (os error {exc.errno})"
            ) from exc

    def _tear_down(self) -> None:
        """Drop the booted VM's devices (the config and the serial port stay)."""
        if self.guest is not None:
            self.guest.stop()
            self.guest = None
        if self.vsock is not None:
            self.vsock.close()
            self.vsock = None
        for fd in self.disk_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.disk_fds = []
        self.gate.thaw()
        self._set_running(False)

    def _start_guest(self, delay: float) -> None:
        self.boot_id = uuid.uuid4().hex[:12]
        self._serial_out(f"chsim guest {self.boot_id} booting\r\n")
        if self.guest is not None:
            self.guest.start(delay)
        self._serial_out("sandbox login: ")

    def _drop_vm(self) -> None:
        self._tear_down()
        for fds in self.net_fds.values():
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.net_fds = {}
        if self.serial is not None:
            self.serial.close()
            self.serial = None
        self.config = None
        self.state = None

    def _memory_actual(self, cfg: dict[str, Any]) -> int:
        mem = cfg["memory"]
        return int(mem["size"]) + int(mem.get("hotplugged_size") or 0)

    def shutdown_everything(self) -> None:
        with self.lock:
            self._drop_vm()

    # -------------------------------------------------------------------- endpoints

    def op_vmm_ping(self, _: None) -> tuple[int, Any]:
        return 200, {
            "build_version": f"{VERSION}-chsim",
            "version": "53.0.0",
            "pid": os.getpid(),
            "features": ["kvm", "io_uring"],
        }

    def op_vmm_shutdown(self, _: None) -> tuple[int, Any]:
        self._drop_vm()
        self.exiting.set()
        return 200, None  # the spec says 204; v53 sends 200 with an empty body

    def op_vm_create(self, body: dict[str, Any]) -> None:
        if self.config is not None:
            raise failed("Error creating VM", "VM is already created")
        cfg = _with_defaults(body)
        serial = cfg["serial"]
        if serial.get("mode") == "Socket":
            try:
                self.serial = SerialPort(serial["socket"], self.gate)
            except OSError as exc:
                raise failed(
                    "Error creating VM", f"Error creating serial socket: {exc.strerror}"
                ) from exc
        self.config = cfg
        self.state = "Created"

    def op_vm_add_net(self, body: dict[str, Any]) -> tuple[int, Any] | None:
        action = "Error adding net device to the VM"
        cfg = self._require_vm(action)
        fds, self.request_fds = self.request_fds, []
        try:
            net = dict(body)
            net.pop("fds", None)  # numbers in JSON are never descriptors (ignored, logged)
            net.setdefault("num_queues", 2)
            net.setdefault("queue_size", 256)
            net.setdefault("mac", "52:54:00:" + random.randbytes(3).hex(":"))
            taken = {d.get("id") for d in cfg.get("disks") or []}
            taken |= {n.get("id") for n in cfg.get("net") or []}
            net.setdefault("id", f"_net{len(cfg.get('net') or [])}")
            if net["id"] in taken:
                raise failed(action, f"Identifier {net['id']} is not unique")
            if fds and net["num_queues"] != 2 * len(fds):
                raise failed(
                    action,
                    f"Number of queues to fds mismatch: {net['num_queues']} != {2 * len(fds)}",
                )
            for fd in fds:
                _check_tap(fd, action)
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        cfg.setdefault("net", []).append(net)
        self.net_fds[net["id"]] = fds
        if self.state in ("Running", "Paused"):
            return 200, {"id": net["id"], "bdf": f"0000:00:{len(cfg['net']) + 8:02x}.0"}
        return None

    def op_vm_boot(self, _: None) -> None:
        cfg = self._require_vm("Error booting VM")
        if self.state in ("Running", "Paused"):
            raise failed("Error booting VM", "VM is already booted")
        self._check_bootable(cfg)
        self._bring_up("Error booting VM")
        self.state = "Running"
        self._set_running(True)
        self._start_guest(self.agent_delay)

    def op_vm_shutdown(self, _: None) -> None:
        self._require_vm("Error shutting down VM")
        if self.state not in ("Running", "Paused"):
            raise failed("Error shutting down VM", "VM is not booted")
        self._tear_down()
        self.state = "Shutdown"

    def op_vm_reboot(self, _: None) -> None:
        self._require_vm("Error rebooting VM")
        if self.state != "Running":
            raise failed("Error rebooting VM", "VM is not running")
        if self.vsock is not None:
            self.vsock.reset_connections()
        self._serial_out("\r\nreboot: Restarting system\r\n")
        self._start_guest(self.agent_delay)

    def op_vm_power_button(self, _: None) -> None:
        self._require_vm("Error triggering power button")
        if self.state != "Running":
            raise failed("Error triggering power button", "VM is not running")
        self._serial_out("\r\nPower button pressed: powering off\r\n")
        threading.Timer(self.poweroff_delay, self._guest_powered_off).start()

    def _guest_powered_off(self) -> None:
        with self.lock:
            if self.state != "Running":
                return
            self._tear_down()
            self.state = "Shutdown"
            if not self.no_shutdown:
                # Without --no-shutdown the VMM process exits when its guest powers off.
                self._drop_vm()
                self.exiting.set()

    def op_vm_nmi(self, _: None) -> None:
        self._require_vm("Error injecting NMI")
        if self.state != "Running":
            raise failed("Error injecting NMI", "VM is not running")
        self._serial_out("\r\nNMI received\r\n")

    def op_vm_pause(self, _: None) -> None:
        self._require_vm("Error pausing VM")
        if self.state == "Paused":
            raise failed("Error pausing VM", "Invalid transition: VM is already paused")
        if self.state != "Running":
            raise failed("Error pausing VM", "VM is not running")
        self.gate.freeze()
        if self.guest is not None:
            self.guest.freeze()
        self._set_running(False)
        self.state = "Paused"

    def op_vm_resume(self, _: None) -> None:
        self._require_vm("Error resuming VM")
        if self.state != "Paused":
            raise failed("Error resuming VM", "Invalid transition: VM is not paused")
        self._resume()

    def _resume(self) -> None:
        if self.guest is not None:
            if self.guest.timer is None and self.guest.proc is None and self.guest.listener is None:
                # Restored: the guest's agent was running at snapshot time. A host process
                # cannot be restored, so start a fresh one at once.
                self.guest.start(0.0)
            self.guest.thaw()
        self.gate.thaw()
        self._set_running(True)
        self.state = "Running"

    def op_vm_delete(self, _: None) -> None:
        self._drop_vm()  # 204 even if there was no VM

    def op_vm_info(self, _: None) -> tuple[int, Any]:
        cfg = self._require_vm("Error getting VM info")
        tree: dict[str, Any] = {}
        ids = [d["id"] for d in cfg.get("disks") or []] + [n["id"] for n in cfg.get("net") or []]
        if cfg.get("vsock"):
            ids.append(cfg["vsock"]["id"])
        ids.append("_rng")
        for slot, dev in enumerate(ids, start=1):
            tree[dev] = {
                "id": dev,
                "resources": [],
                "children": [],
                "pci_bdf": f"0000:00:{slot:02x}.0",
            }
        return 200, {
            "config": cfg,
            "state": self.state,
            "memory_actual_size": self._memory_actual(cfg),
            "device_tree": tree,
        }

    def op_vm_counters(self, _: None) -> tuple[int, Any]:
        cfg = self._require_vm("Error getting VM counters")
        if self.state not in ("Running", "Paused"):
            raise failed("Error getting VM counters", "VM is not booted")
        running = self.running_total + (
            time.monotonic() - self.running_since if self.running_since else 0.0
        )
        ticks = int(running * 1000)
        out: dict[str, dict[str, int]] = {}
        for disk in cfg.get("disks") or []:
            out[disk["id"]] = {
                "read_bytes": ticks * 4096,
                "read_ops": ticks,
                "write_bytes": 0 if disk.get("readonly") else ticks * 512,
                "write_ops": 0 if disk.get("readonly") else ticks // 8,
                "read_latency_min": 10,
                "read_latency_max": 900,
                "read_latency_avg": 120,
                "write_latency_min": 12,
                "write_latency_max": 1500,
                "write_latency_avg": 200,
            }
        for net in cfg.get("net") or []:
            out[net["id"]] = {
                "rx_bytes": ticks * 1500,
                "rx_frames": ticks,
                "tx_bytes": ticks * 700,
                "tx_frames": ticks,
            }
        return 200, out

    def op_vm_resize(self, body: dict[str, Any]) -> None:
        action = "Error resizing VM"
        cfg = self._require_vm(action)
        cpus, mem = cfg["cpus"], cfg["memory"]
        booted = self.state in ("Running", "Paused")
        if "desired_vcpus" in body:
            desired = body["desired_vcpus"]
            if booted and time.monotonic() < self.removal_pending_until:
                raise ApiError(429, "Error from API", action, "vCPU removal still pending")
            if desired > cpus["max_vcpus"]:
                raise failed(action, "Error resizing vCPUs", "Desired vCPUs exceed max_vcpus")
            if booted and desired < cpus["boot_vcpus"]:
                self.removal_pending_until = time.monotonic() + self.removal_delay
            cpus["boot_vcpus"] = desired
        if "desired_ram" in body:
            desired = body["desired_ram"]
            current = self._memory_actual(cfg)
            hotplug = int(mem.get("hotplug_size") or 0)
            if mem.get("zones"):
                raise failed(action, "Cannot resize memory when memory zones are used")
            if not booted:
                mem["size"] = desired  # not booted: resize only edits the config
            elif desired > current:
                if hotplug == 0:
                    raise failed(action, "Error resizing memory", "Memory hotplug is not enabled")
                if desired > int(mem["size"]) + hotplug:
                    raise failed(action, "Error resizing memory", "Not enough hotplug space")
                if (desired - current) % HOTPLUG_ALIGN:
                    raise failed(
                        action, "Error resizing memory", "Invalid size (not 128 MiB aligned)"
                    )
                mem["hotplugged_size"] = desired - int(mem["size"])
            # Shrinking with ACPI hotplug is accepted and takes effect only after a reboot.
        if "desired_balloon" in body and not cfg.get("balloon"):
            raise failed(action, "No balloon device")
        if "desired_balloon" in body:
            cfg["balloon"]["size"] = body["desired_balloon"]

    def op_vm_snapshot(self, body: dict[str, Any]) -> None:
        action = "Error snapshotting VM"
        cfg = self._require_vm(action)
        if self.state == "Running":
            raise failed(action, "Trying to snapshot while VM is running")
        if self.state != "Paused":
            raise failed(action, "VM is not booted")
        url = body.get("destination_url", "")
        if not url.startswith("file://"):
            raise failed(action, f"Invalid URL: {url}")
        directory = Path(url[len("file://") :])
        state = {
            "chsim": 1,
            "vcpus": cfg["cpus"]["boot_vcpus"],
            "memory_actual_size": self._memory_actual(cfg),
            "running_total": self.running_total,
        }
        memory = json.dumps({"boot_id": self.boot_id}).encode()
        files = (
            ("config.json", json.dumps(cfg, indent=2).encode()),
            ("state.json", json.dumps(state).encode()),
            ("memory-ranges", memory),
        )
        for name, data in files:
            try:
                fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as exc:
                raise failed(
                    action, "Error saving snapshot", f"{exc.strerror} (os error {exc.errno})"
                ) from exc
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)

    def op_vm_restore(self, body: dict[str, Any]) -> None:
        action = "Error restoring VM"
        if self.config is not None:
            raise failed(action, "VM is already created")
        if body.get("memory_restore_mode") == "OnDemand" and body.get("prefault"):
            raise failed(action, "prefault cannot be combined with OnDemand restore")
        url = body["source_url"]
        if not url.startswith("file://"):
            raise failed(action, f"Invalid URL: {url}")
        directory = Path(url[len("file://") :])
        try:
            cfg = json.loads((directory / "config.json").read_text())
            state = json.loads((directory / "state.json").read_text())
            memory = json.loads((directory / "memory-ranges").read_bytes())
        except (OSError, ValueError) as exc:
            raise failed(action, "Error loading snapshot", str(exc)) from exc
        errors = self.spec.errors("VmConfig", cfg)
        if errors:
            raise failed(action, "Invalid config.json", *errors)
        self.op_vm_create(cfg)
        try:
            self._bring_up(action)
        except ApiError:
            self._drop_vm()  # a failed restore deletes the half-built VM
            raise
        self.running_total = float(state.get("running_total", 0.0))
        self.boot_id = str(memory.get("boot_id", ""))
        self.state = "Paused"
        self.gate.freeze()
        if body.get("resume"):
            self._resume()


TUNGETIFF = 0x800454D2
IFF_TAP, IFF_VNET_HDR = 0x0002, 0x4000


def _check_tap(fd: int, action: str) -> None:
    """CH opens a passed descriptor as a TAP with vnet headers, or fails the request."""
    try:
        flags = struct.unpack("16sH", fcntl.ioctl(fd, TUNGETIFF, bytes(40))[:18])[1]
    except OSError as exc:
        raise failed(action, f"Failed to open tap from fd {fd}: {exc.strerror}") from exc
    if flags & (IFF_TAP | IFF_VNET_HDR) != IFF_TAP | IFF_VNET_HDR:
        raise failed(action, f"Failed to open tap from fd {fd}: not a TAP with vnet headers")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # a client that opens a connection and sends nothing must not wedge the VMM
    server: _Server
    fds: list[int]

    def setup(self) -> None:
        """Take the descriptors that came with the request's first bytes (a peek: the bytes
        stay for the HTTP parser; the kernel gives the descriptors to the peeking reader)."""
        super().setup()
        self.fds = []
        try:
            _data, ancillary, _flags, _addr = self.request.recvmsg(
                1, socket.CMSG_SPACE(16 * 4), socket.MSG_PEEK
            )
        except OSError:
            return
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(data) - len(data) % 4
                self.fds += list(struct.unpack(f"{usable // 4}i", data[:usable]))

    def version_string(self) -> str:
        return "Cloud Hypervisor API"

    def log_message(self, format: str, *args: Any) -> None:
        log(format % args)

    def _dispatch(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._drain_chunked()
            self._send(400, b'{"error": "Chunked transfer encoding is not supported"}')
            self.close_connection = True
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        fds, self.fds = self.fds, []
        status, payload = self.server.vmm.handle(self.command, self.path, body, headers, fds)
        self._send(status, payload)

    def _drain_chunked(self) -> None:
        # Read the refused body anyway, so the client is not cut off mid-send.
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            self.rfile.read(size + 2)
            if size == 0:
                return

    def _send(self, status: int, payload: bytes | None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if status != 204:
            self.send_header("Content-Length", str(len(payload or b"")))
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = _dispatch


class _Server(socketserver.UnixStreamServer):
    def __init__(self, path: str, vmm: Vmm) -> None:
        self.vmm = vmm
        super().__init__(path, _Handler)


def _api_path(value: str) -> str:
    for part in value.split(","):
        if part.startswith("path="):
            return part[len("path=") :]
        if part.startswith("fd="):
            raise SystemExit("chsim: --api-socket fd= is not supported")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloud-hypervisor", description=__doc__)
    parser.add_argument("--api-socket", required=True)
    parser.add_argument("--no-shutdown", action="store_true")
    # As CH: a forbidden syscall kills (true), is logged (log) or fails with EPERM (errno, v53).
    parser.add_argument("--seccomp", choices=("true", "false", "log", "errno"), default="true")
    args, ignored = parser.parse_known_args(argv)
    if ignored:
        log(f"ignoring options {ignored}")
    path = _api_path(args.api_socket)
    # CH holds an exclusive lock on <socket>.lock; a second VMM on the same path fails.
    lock = open(f"{path}.lock", "a")  # held (and locked) for the process lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.stderr.write(f"Error: API socket {path} is in use by another VMM\n")
        return 1
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a stale socket from a killed VMM
    vmm = Vmm(load(), no_shutdown=args.no_shutdown)
    server = _Server(path, vmm)
    server.timeout = 0.1

    def stop(signum: int, _frame: object) -> None:
        log(f"signal {signum}: shutting down")
        vmm.exiting.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log(f"listening on {path} (pid {os.getpid()})")
    try:
        while not vmm.exiting.is_set():
            server.handle_request()
    finally:
        vmm.shutdown_everything()  # clean exit: the vsock socket file goes with its device
        server.server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
