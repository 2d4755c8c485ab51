"""Keystroke echo round trip through the console websocket bridge, against the serial socket direct.

    python bench/console.py [--samples 200] [--blocks 4]

Starts everything it needs in a temporary directory (an embedded SQLite database, ``manage.py
worker``, a linux-small guest created through ``vms.commands``, daphne serving the real ASGI
application) and stops all of it at the end. Then, alternating blocks so that host noise hits both
sides alike, it types one character at a time and waits for the guest's echo:

- direct: on the VMM's ``console.sock`` (what the bridge itself reads from);
- bridge: through ``ws/vms/<id>/console/`` (browser -> daphne -> consumer -> hub -> serial and
  back), with a logged-in session, exactly as the browser does.

The serial socket takes one client at a time, so the two are measured in turns (the hub lets go of
the socket when its last websocket closes). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout}s waiting for {what}")


class Direct:
    """The serial socket itself."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5.0)
        self.sock.connect(str(path))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float) -> bytes:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            return b""

    def close(self) -> None:
        self.sock.close()


class Bridge:
    """The dashboard's console websocket, logged in with a session cookie."""

    def __init__(self, url: str, origin: str, cookie: str) -> None:
        import websocket  # websocket-client

        self.ws = websocket.create_connection(url, cookie=cookie, origin=origin, timeout=5)
        self.ws.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes) -> None:
        self.ws.send_binary(data)

    def recv(self, timeout: float) -> bytes:
        import websocket

        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.ws.settimeout(left)
            try:
                opcode, data = self.ws.recv_data()
            except websocket.WebSocketTimeoutException:
                return b""
            if opcode == websocket.ABNF.OPCODE_BINARY:
                return data
            # Text frames are status messages (session, serial link): not terminal output.
        return b""

    def close(self) -> None:
        self.ws.close()


def drain(link: Direct | Bridge, quiet: float = 0.15) -> None:
    while link.recv(quiet):
        pass


def echo_times(link: Direct | Bridge, n: int, warmup: int = 5) -> list[float]:
    """Type 'x' n times (after a few unmeasured), timing each until its echo arrives."""
    link.send(b"\x15")  # ^U: an empty line to type on
    drain(link)
    times: list[float] = []
    for i in range(n + warmup):
        start = time.perf_counter()
        link.send(b"x")
        seen = b""
        while b"x" not in seen:
            chunk = link.recv(5.0)
            if not chunk:
                raise SystemExit(f"no echo from the guest within 5s ({type(link).__name__}, {i})")
            seen += chunk
        elapsed = (time.perf_counter() - start) * 1000
        if i >= warmup:
            times.append(elapsed)
        if i % 40 == 39:
            link.send(b"\x15")
            drain(link, 0.05)
    link.send(b"\x15")
    drain(link, 0.05)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="per side")
    parser.add_argument("--blocks", type=int, default=4, help="alternations of the two sides")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sbx-bench-console-"))
    run = Path(f"/tmp/sbxbc-{os.getpid()}")
    run.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(
        DJANGO_SETTINGS_MODULE="sandbox_site.settings",
        SANDBOX_DATA_DIR=str(tmp / "data"),
        SANDBOX_SQLITE_PATH=str(tmp / "bench.sqlite3"),
        SANDBOX_RUNTIME_DIR=str(run),
        SANDBOX_VM_DATA_DIR=str(tmp / "vms"),
        SANDBOX_SNAPSHOT_DIR=str(tmp / "snapshots"),
        SANDBOX_HYPERVISOR="qemu",
        SANDBOX_WORKERS="1",
        SANDBOX_NETWORKING="off",  # the console needs no NIC; no namespace on this machine
        SANDBOX_LOG_LEVEL="WARNING",
        DJANGO_SECRET_KEY="bench-console-" + os.urandom(8).hex(),
    )
    os.environ.clear()
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command
    from django.test import Client

    from accounts import commands as accounts
    from accounts.caller import Caller
    from audit.actor import Actor
    from vms import commands, images, runtime
    from vms.models import VirtualMachine

    images.ensure_built()
    call_command("migrate", verbosity=0)
    procs: list[subprocess.Popen[bytes]] = []
    vm = None
    try:
        user = accounts.create_user(
            Actor.system(channel="shell", name="bench"),
            username="bench",
            password=None,
            role="operator",
        )
        log = (tmp / "processes.log").open("ab")

        def spawn(argv: list[str]) -> None:
            procs.append(
                subprocess.Popen(
                    argv, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True
                )
            )

        spawn([sys.executable, str(ROOT / "manage.py"), "worker"])
        port = free_port()
        spawn(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port)]
            + ["sandbox_site.asgi:application"]
        )
        vm = commands.create(
            Caller.for_user(user, channel="shell"), name="bench-console", template="linux-small"
        ).vm

        def settled() -> VirtualMachine | None:
            fresh = VirtualMachine.objects.get(pk=vm.pk)
            return fresh if fresh.state in ("running", "failed") and not fresh.busy else None

        ready = wait_until(settled, 180, "the guest to run", 0.2)
        if ready.state != "running":
            raise SystemExit(f"the guest did not start: {ready.last_error}")
        client = Client()
        client.force_login(user)
        cookie = f"sessionid={client.cookies['sessionid'].value}"
        origin = f"http://127.0.0.1:{port}"
        url = f"ws://127.0.0.1:{port}/ws/vms/{vm.pk}/console/"
        serial = runtime.runtime_dir(vm.pk).serial_socket

        def bridge_up() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return True
            return False

        wait_until(bridge_up, 30, "daphne to listen")
        # The shell on ttyS0 is up once it answers a newline with a prompt.
        probe = Direct(serial)
        wait_until(lambda: probe.send(b"\n") or b"#" in probe.recv(1.0), 60, "a shell prompt")
        drain(probe)
        probe.close()

        direct: list[float] = []
        bridge: list[float] = []
        per_block = max(1, args.samples // args.blocks)
        for _ in range(args.blocks):
            link: Direct | Bridge = Direct(serial)
            direct += echo_times(link, per_block)
            link.close()
            link = Bridge(url, origin, cookie)
            drain(link, 0.3)  # session status and the scrollback
            bridge += echo_times(link, per_block)
            link.close()
            time.sleep(0.2)  # the hub lets go of the serial socket when the websocket is gone

        result = {
            "bench": "console",
            "samples_per_side": len(direct),
            "direct_p50_ms": round(pct(direct, 0.5), 3),
            "direct_p95_ms": round(pct(direct, 0.95), 3),
            "bridge_p50_ms": round(pct(bridge, 0.5), 3),
            "bridge_p95_ms": round(pct(bridge, 0.95), 3),
            "added_p50_ms": round(pct(bridge, 0.5) - pct(direct, 0.5), 3),
            "added_p95_ms": round(pct(bridge, 0.95) - pct(direct, 0.95), 3),
            "direct_mean_ms": round(statistics.fmean(direct), 3),
            "bridge_mean_ms": round(statistics.fmean(bridge), 3),
            "hypervisor": ready.hypervisor,
        }
        print(
            f"direct p50 {result['direct_p50_ms']} ms p95 {result['direct_p95_ms']} ms; "
            f"bridge p50 {result['bridge_p50_ms']} ms p95 {result['bridge_p95_ms']} ms"
        )
    finally:
        if vm is not None:
            with contextlib.suppress(Exception):
                fresh = VirtualMachine.objects.get(pk=vm.pk)
                if fresh.state != "destroyed":
                    commands.destroy(Caller.for_user(fresh.owner, channel="shell"), fresh)
                wait_until(
                    lambda: VirtualMachine.objects.get(pk=vm.pk).state == "destroyed",
                    60,
                    "the guest to be destroyed",
                    0.2,
                )
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        from vms.hypervisors import reconcile as scanner

        leftovers = list(scanner.scan(run, known_ids=[]).orphans)
        scanner.teardown_orphans(leftovers)
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
