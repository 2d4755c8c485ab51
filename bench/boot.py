"""Boot, restore and agent round-trip figures for the QEMU driver, measured in one run.

    python bench/boot.py [--cold N] [--restores N] [--pings N] [--execs N]

What it compares, each several times (medians reported):

* raw: the driver's own QEMU command line started by hand (``subprocess.Popen``) and polled with
  a minimal hand-written hello on the agent socket, vs driver: ``QemuHypervisor.start`` plus
  ``AgentClient.hello``. Both sides poll for the agent at the same cadence (a hello every 200 ms), so the
  difference is the driver's own overhead (validation, vm.json, pidfile, QMP handshake).
  Runs alternate raw/driver so that host noise hits both alike.
* restore: ``QemuHypervisor.restore`` from the template snapshot plus hello, vs the driver's cold
  boot above.
* round trips on a restored guest: agent ping, and exec of ``true`` (host round trip, and that
  minus the run time the agent measured for the process: the protocol's overhead).

It starts everything it needs (building the guest image if missing) and stops it all at the end.
The last line of output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vms import images  # noqa: E402
from vms.agent import readiness  # noqa: E402
from vms.agent.client import AgentClient, AgentTimeout  # noqa: E402
from vms.hypervisors import process  # noqa: E402
from vms.hypervisors.base import DiskSpec, RuntimeDir, TemplateHooks, VMSpec  # noqa: E402
from vms.hypervisors.qemu import QemuHypervisor  # noqa: E402
from vms.hypervisors.templates import TemplateCache  # noqa: E402

MAGIC = b"\x7fSBA"
# Both sides send a hello every POLL_S until answered. Not faster: while the guest has not
# opened its port QEMU does not read the socket, and unread hellos would fill its buffer.
POLL_S = 0.2
BOOT_TIMEOUT_S = 120.0


def log(msg: str) -> None:
    print(msg, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]


def raw_hello(path: Path, deadline: float) -> None:
    """Connect to the agent socket and send hello frames until one is answered. Any answer to
    this hello counts (a fresh guest's agent, not enrolled yet, answers ``not_enrolled``: it is
    up, which is what is timed); the driver's side enrolls and greets it properly."""
    sock: socket.socket | None = None
    buf = b""
    n = 0
    while time.monotonic() < deadline:
        if sock is None:
            fresh = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                fresh.connect(str(path))
            except OSError:
                fresh.close()
                time.sleep(POLL_S)
                continue
            sock = fresh
        n += 1
        head = json.dumps({"op": "hello", "id": n, "protocol": [2]}).encode()
        sock.settimeout(POLL_S)
        try:
            sock.sendall(MAGIC + len(head).to_bytes(4, "big") + (0).to_bytes(4, "big") + head)
        except TimeoutError:
            continue
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    raise OSError("closed")
                buf += chunk
                at = buf.find(MAGIC)
                if at >= 0 and len(buf) >= at + 12:
                    hlen = int.from_bytes(buf[at + 4 : at + 8], "big")
                    if len(buf) >= at + 12 + hlen:
                        reply = json.loads(buf[at + 12 : at + 12 + hlen])
                        # Any of the hellos sent so far: under load the agent answers an
                        # earlier one after this loop has sent more (waiting for the last
                        # one's answer only timed out with answers arriving).
                        if isinstance(reply.get("id"), int) and 1 <= reply["id"] <= n:
                            sock.close()
                            return
                        buf = buf[at + 12 + hlen :]
        except TimeoutError:
            continue
        except OSError:
            sock.close()
            sock = None
    if sock is not None:
        sock.close()
    raise TimeoutError("raw hello: no answer")


BENCH_CREDENTIAL = secrets.token_urlsafe(32)  # the guests this bench boots are enrolled with it


def driver_hello(
    hv: QemuHypervisor, runtime: RuntimeDir, deadline: float, credential: str = BENCH_CREDENTIAL
) -> AgentClient:
    """AgentClient.hello, polled at the same cadence as raw_hello. A cold-booted guest is enrolled
    with ``credential``; a restored one already has its template's (pass that)."""
    client = AgentClient(lambda: hv.agent_connect(runtime, 2.0), timeout=30.0)
    while True:
        try:
            client.hello_enrolling(credential, timeout=POLL_S, interval=POLL_S)
            return client
        except AgentTimeout:
            if time.monotonic() >= deadline:
                client.close()
                raise


def raw_pings(sock: socket.socket, n: int, credential: str) -> list[float]:
    """Ping round trips with hand-made frames and no client machinery (thread, queues): the
    transport's share of the ping time. Returns milliseconds."""
    # The guest agent notices a new host connection on its next poll: until then pings are lost.
    sock.settimeout(0.1)
    for i in range(100):
        head = json.dumps({"op": "ping", "id": 9_000 + i, "auth": credential}).encode()
        sock.sendall(MAGIC + len(head).to_bytes(4, "big") + (0).to_bytes(4, "big") + head)
        try:
            if sock.recv(65536):
                break
        except TimeoutError:
            continue
    time.sleep(0.2)
    sock.settimeout(0.05)
    with contextlib.suppress(TimeoutError):
        while sock.recv(65536):  # drain late answers to the probing pings
            pass
    sock.settimeout(5.0)
    out = []
    for i in range(n):
        head = json.dumps({"op": "ping", "id": 10_000 + i, "auth": credential}).encode()
        frame = MAGIC + len(head).to_bytes(4, "big") + (0).to_bytes(4, "big") + head
        t0 = time.perf_counter()
        sock.sendall(frame)
        buf = b""
        while True:
            buf += sock.recv(65536)
            if len(buf) >= 12 and len(buf) >= 12 + int.from_bytes(buf[4:8], "big"):
                break
        out.append((time.perf_counter() - t0) * 1000)
    return out


def run_raw(hv: QemuHypervisor, spec: VMSpec, runtime: RuntimeDir) -> float:
    runtime.create()
    argv = hv.build_argv(spec, runtime)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        raw_hello(runtime.agent_socket, t0 + BOOT_TIMEOUT_S)
        return time.monotonic() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(runtime.root, ignore_errors=True)


def run_driver(hv: QemuHypervisor, spec: VMSpec, runtime: RuntimeDir) -> tuple[float, float]:
    """(start to agent ready, time spent inside ``hv.start``)."""
    t0 = time.monotonic()
    hv.start(spec, runtime)
    in_start = time.monotonic() - t0
    try:
        driver_hello(hv, runtime, t0 + BOOT_TIMEOUT_S).close()
        return time.monotonic() - t0, in_start
    finally:
        hv.destroy(runtime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", type=int, default=3, help="cold boots per variant")
    parser.add_argument("--restores", type=int, default=5)
    parser.add_argument("--pings", type=int, default=300)
    parser.add_argument("--execs", type=int, default=100)
    args = parser.parse_args()

    image = images.ensure_built()
    hv = QemuHypervisor()
    root = Path(tempfile.mkdtemp(prefix="bb-", dir="/tmp"))
    cache = root / "templates"
    spec0 = VMSpec(
        vm_id="x",
        memory_mib=256,
        kernel=image.kernel,
        initramfs=image.initramfs,
        cmdline=image.cmdline,
        disks=(DiskSpec(image.rootfs, readonly=True, id="root"),),
    )
    log(f"image {image.directory.name}, accel {hv.accel}, qemu {hv._version()}")
    out: dict[str, object] = {"accel": hv.accel, "image": image.directory.name}
    client: AgentClient | None = None
    pinged = RuntimeDir(root / "rtt")
    try:
        raw: list[float] = []
        drv: list[float] = []
        start_calls: list[float] = []
        for i in range(args.cold):
            raw.append(run_raw(hv, spec0.replace(vm_id=f"raw{i}"), RuntimeDir(root / f"raw{i}")))
            log(f"raw boot {i}: {raw[-1]:.2f}s")
            total, in_start = run_driver(
                hv, spec0.replace(vm_id=f"drv{i}"), RuntimeDir(root / f"drv{i}")
            )
            drv.append(total)
            start_calls.append(in_start)
            log(f"driver boot {i}: {drv[-1]:.2f}s")

        # A fresh template (own cache dir): its build time is a cold boot plus a save.
        hooks = TemplateHooks(readiness.wait_ready, readiness.reset_identity, images.make_data_disk)
        templates = TemplateCache(hv, hooks, cache_dir=cache, scratch_root=root)
        t0 = time.monotonic()
        snap = templates.ensure(spec0)
        out["template_build_s"] = round(time.monotonic() - t0, 3)
        out["state_mib"] = round((snap.directory / "state.bin").stat().st_size / 2**20, 1)
        log(f"template built in {out['template_build_s']}s, state {out['state_mib']} MiB")

        template_credential = templates.guest_secret(snap) or BENCH_CREDENTIAL
        restores, starts = [], []
        for i in range(args.restores):
            rt = RuntimeDir(root / f"rs{i}")
            spec = spec0.replace(vm_id=f"rs{i}")
            t0 = time.monotonic()
            hv.restore(spec, rt, snap)
            driver_hello(hv, rt, t0 + 30, template_credential).close()
            restores.append(time.monotonic() - t0)
            hv.destroy(rt)
            # The full fast path: restore + hello + clock/hostname reset through the agent.
            rt = RuntimeDir(root / f"ts{i}")
            result = templates.start(spec0.replace(vm_id=f"ts{i}"), rt, fallback=False)
            starts.append(result.seconds)
            hv.destroy(rt)
            log(f"restore {i}: {restores[-1]:.3f}s; template start {starts[-1]:.3f}s")

        hv.restore(spec0.replace(vm_id="rtt"), pinged, snap)
        client = driver_hello(hv, pinged, time.monotonic() + 30, template_credential)
        for _ in range(20):  # warm-up
            client.ping()
        pings = [client.ping() * 1000 for _ in range(args.pings)]
        client.exec(["true"])
        execs, overhead = [], []
        for _ in range(args.execs):
            t0 = time.perf_counter()
            res = client.exec(["true"])
            rtt = (time.perf_counter() - t0) * 1000
            assert res.exit_code == 0
            execs.append(rtt)
            overhead.append(rtt - res.duration_s * 1000)

        client.close()
        client = None
        with hv.agent_connect(pinged, 5.0) as sock:
            raw_ping = raw_pings(sock, args.pings, template_credential)

        raw_s, drv_s = statistics.median(raw), statistics.median(drv)
        restore_s = statistics.median(restores)
        out.update(
            {
                "raw_boot_s": round(raw_s, 3),
                "driver_boot_s": round(drv_s, 3),
                "driver_overhead_ratio": round(drv_s / raw_s, 3),
                "driver_start_call_s": round(statistics.median(start_calls), 3),
                "restore_s": round(restore_s, 3),
                "restore_vs_cold_ratio": round(restore_s / drv_s, 3),
                "template_start_s": round(statistics.median(starts), 3),
                "ping_rtt_p50_ms": round(statistics.median(pings), 3),
                "ping_rtt_p99_ms": round(pct(pings, 0.99), 3),
                "ping_raw_socket_p50_ms": round(statistics.median(raw_ping), 3),
                "exec_rtt_p50_ms": round(statistics.median(execs), 2),
                "exec_rtt_p99_ms": round(pct(execs, 0.99), 2),
                "exec_overhead_p50_ms": round(statistics.median(overhead), 2),
                "raw_boot_samples_s": [round(x, 3) for x in raw],
                "driver_boot_samples_s": [round(x, 3) for x in drv],
                "restore_samples_s": [round(x, 3) for x in restores],
                "iterations": {
                    "cold": args.cold,
                    "restores": args.restores,
                    "pings": args.pings,
                    "execs": args.execs,
                },
            }
        )
    finally:
        if client is not None:
            client.close()
        with contextlib.suppress(Exception):
            hv.destroy(pinged)
        for d in root.iterdir() if root.exists() else ():
            if d.is_dir() and (d / "vmm.pid").exists():
                hv.destroy(RuntimeDir(d))
        shutil.rmtree(root, ignore_errors=True)
        left = [
            p.pid for p in process.iter_processes(hv.exe_names) if str(root) in " ".join(p.argv)
        ]
        if left:
            log(f"WARNING: QEMU processes left behind: {left}")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
