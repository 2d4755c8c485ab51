"""Sandbox networking figures with real QEMU guests, measured in one run.

    python bench/network.py [--creates N] [--megabytes N] [--pings N]

* create_with_nic_s / create_without_nic_s: the worker's start path for one VM, median of
  --creates each, measured in A/B pairs (the order alternating from pair to pair) so that host
  noise hits both alike: with a NIC, plugging it (TAP and descriptor, then its bridge port and
  rules while the VMM restores: ``vms.netplumb.plug_begin``) and starting the guest from its
  template (restore, then the agent sets clock, hostname, MAC and address), until the agent
  answers; without, the same template start of a guest that has no NIC.
  ``nic_overhead_pct`` is the difference of the medians relative to the start without a NIC;
  ``nic_overhead_paired_s`` and ``nic_overhead_paired_pct`` the medians of each pair's
  difference and ratio (``pairs`` of them), which load that changes during the run affects less.
* guest_to_guest_mbit_s: --megabytes sent over TCP from one guest to another on one network
  (both ends Python in the guests, timed by the receiver).
* forward_rtt_p50_ms: request/answer round trips of one byte over an established connection from
  this process to 127.0.0.1:<host port>, through the worker's userspace forwarder
  (``vms.forwarder``), the host link and the forward's DNAT rule to an echo server in a guest.

Everything runs in network namespaces this script creates (the product's, one standing in for
the host) and removes at the end, with a template cache of its own; no traffic leaves them except
on 127.0.0.1. Needs root. The last line of output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vms import forwarder, images, netplumb  # noqa: E402
from vms.agent import readiness  # noqa: E402
from vms.agent.client import AgentClient  # noqa: E402
from vms.hypervisors.base import DiskSpec, RuntimeDir, TemplateHooks, VMSpec  # noqa: E402
from vms.hypervisors.qemu import QemuHypervisor  # noqa: E402
from vms.hypervisors.templates import TemplateCache  # noqa: E402
from vms.network import bridge as br  # noqa: E402
from vms.network import netns, ruleset  # noqa: E402

BOOT_TIMEOUT_S = 180.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


BENCH_CREDENTIAL = secrets.token_urlsafe(32)  # the guests this bench boots are enrolled with it


def hello(hv: QemuHypervisor, rt: RuntimeDir, timeout: float = 60.0) -> AgentClient:
    client = AgentClient(lambda: hv.agent_connect(rt, 2.0), timeout=60.0, name=rt.root.name)
    client.hello_enrolling(BENCH_CREDENTIAL, timeout=timeout, interval=0.05)
    return client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--creates", type=int, default=11, help="A/B pairs of starts")
    parser.add_argument("--megabytes", type=int, default=32)
    parser.add_argument("--pings", type=int, default=300)
    args = parser.parse_args()
    if os.geteuid() != 0:
        log("needs root (network namespaces, nftables)")
        return 2

    image = images.ensure_built()
    hv = QemuHypervisor()
    root = Path(tempfile.mkdtemp(prefix="bn-", dir="/tmp"))
    tag = secrets.token_hex(3)
    host_ns = f"bnh{tag}"
    link = f"10.254.{secrets.randbelow(256)}.{4 * secrets.randbelow(64)}/30"
    host = netplumb.HostNet.make(f"bnp{tag}", link, root / "net", host_ns=host_ns)
    subnet = ipaddress.IPv4Network("10.219.20.0/24")
    bridge = br.Bridge("bnbr0", subnet, subnet.network_address + 1, isolated=False)
    hooks = TemplateHooks(readiness.wait_ready, readiness.reset_identity, images.make_data_disk)
    templates = TemplateCache(hv, hooks, cache_dir=root / "templates", scratch_root=root)
    base = VMSpec(
        vm_id="x",
        memory_mib=256,
        kernel=image.kernel,
        initramfs=image.initramfs,
        cmdline=image.cmdline,
        disks=(DiskSpec(image.rootfs, readonly=True, id="root"),),
    )
    runtimes: list[RuntimeDir] = []
    clients: list[AgentClient] = []
    out: dict[str, object] = {"accel": hv.accel}
    stop = threading.Event()
    thread: threading.Thread | None = None
    counter = iter(range(10, 250))

    def nic(index: int, forwards: tuple[ruleset.Forward, ...] = ()) -> netplumb.NicPlan:
        key = secrets.token_hex(16)
        return netplumb.NicPlan(
            key=key,
            tap=f"t{key[:12]}",
            mac=f"52:54:00:7d:00:{index:02x}",
            address=subnet.network_address + index,
            bridge=bridge,
            forwards=forwards,
        )

    def start(name: str, plan: netplumb.NicPlan | None) -> tuple[float, RuntimeDir, AgentClient]:
        rt = RuntimeDir(root / name)
        runtimes.append(rt)
        t0 = time.monotonic()
        # As the worker does: the bridge port and rules are set up while the VMM restores.
        pluggings = (netplumb.plug_begin(host, [bridge], plan),) if plan else ()
        nets = tuple(p.netspec for p in pluggings)

        def network_ready() -> None:
            for plugging in pluggings:
                plugging.wait()

        try:
            result = templates.start(
                base.replace(vm_id=name, nets=nets),
                rt,
                fallback=False,
                network_ready=network_ready,
            )
        finally:
            for plugging in pluggings:
                plugging.join()
            for net in nets:
                if net.fd is not None:
                    os.close(net.fd)
        client = hello(hv, rt)
        elapsed = time.monotonic() - t0
        assert result.restored
        return elapsed, rt, client

    def drop(rt: RuntimeDir, client: AgentClient, plan: netplumb.NicPlan | None) -> None:
        client.close()
        hv.destroy(rt)
        if plan:
            netplumb.unplug(host, plan.key, plan.tap)

    try:
        netns.create(host_ns)
        netplumb.setup_host(host, [bridge])
        # Build both templates first: their cold boots are not part of a create.
        for name, plan in (("warm0", None), ("warm1", nic(next(counter)))):
            _, rt, client = start(name, plan)
            drop(rt, client, plan)

        with_nic: list[float] = []
        without: list[float] = []
        for i in range(args.creates):
            # A/B pairs, the order alternating: neither kind always follows the other's destroy.
            for with_a_nic in (i % 2 == 1, i % 2 == 0):
                plan = nic(next(counter)) if with_a_nic else None
                elapsed, rt, client = start(f"{'n' if plan else 'p'}{i}", plan)
                (with_nic if plan else without).append(elapsed)
                drop(rt, client, plan)
            log(f"create {i}: without NIC {without[-1]:.3f}s, with NIC {with_nic[-1]:.3f}s")
        out["create_without_nic_s"] = round(statistics.median(without), 3)
        out["create_with_nic_s"] = round(statistics.median(with_nic), 3)
        out["nic_overhead_pct"] = round(
            100 * (statistics.median(with_nic) / statistics.median(without) - 1), 1
        )
        # Per pair (the two starts of a pair ran back to back, under the same load): less
        # sensitive to load that drifts during the run than the medians above.
        pairs = list(zip(without, with_nic, strict=True))
        out["nic_overhead_paired_s"] = round(statistics.median(b - a for a, b in pairs), 3)
        out["nic_overhead_paired_pct"] = round(
            100 * statistics.median(b / a - 1 for a, b in pairs), 1
        )
        out["pairs"] = len(pairs)

        # Two guests on one network: throughput from a to b.
        host_port = free_port()
        plan_a = nic(next(counter))
        plan_b = nic(next(counter), (ruleset.Forward("tcp", host_port, 7000),))
        _, _, a = start("ga", plan_a)
        _, _, b = start("gb", plan_b)
        clients += [a, b]
        size = args.megabytes << 20
        sink = (
            "import socket,time;s=socket.socket();"
            "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',9000));"
            "s.listen(1);open('/run/sink','w').close();c,_=s.accept();t=time.monotonic();n=0\n"
            "while True:\n d=c.recv(1<<20)\n if not d: break\n n+=len(d)\n"
            "print(n, time.monotonic()-t)"
        )
        result: dict[str, bytes] = {}

        def run_sink() -> None:
            result["out"] = b.exec(["python3", "-c", sink], timeout=600).stdout

        receiver = threading.Thread(target=run_sink)
        receiver.start()
        while b.exec(["test", "-e", "/run/sink"]).exit_code != 0:
            time.sleep(0.1)
        send = (
            f"import socket;s=socket.create_connection(('{plan_b.address}',9000));"
            f"b=bytes(1<<20)\nfor _ in range({args.megabytes}): s.sendall(b)\ns.close()"
        )
        a.exec(["python3", "-c", send], timeout=600)
        receiver.join(600)
        received, seconds = result["out"].split()
        assert int(received) == size, (received, size)
        out["guest_to_guest_mbit_s"] = round(int(received) * 8 / float(seconds) / 1e6, 1)
        log(f"guest to guest: {out['guest_to_guest_mbit_s']} Mbit/s")

        # Through a forward: the forwarder on 127.0.0.1, the link, the DNAT rule, b's echo.
        echo = (
            "import socket;s=socket.socket();"
            "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',7000));"
            "s.listen(1);open('/run/echo','w').close();c,_=s.accept()\n"
            "while True:\n d=c.recv(64)\n if not d: break\n c.sendall(d)"
        )
        echo_thread = threading.Thread(target=lambda: b.exec(["python3", "-c", echo], timeout=600))
        echo_thread.start()
        while b.exec(["test", "-e", "/run/echo"]).exit_code != 0:
            time.sleep(0.1)
        relay = forwarder.Forwarder("127.0.0.1", host.link.ns_address, host_ns)
        thread = forwarder.run_thread(relay, lambda: {("tcp", host_port)}, stop, poll_s=0.1)
        while not relay.ports:
            time.sleep(0.05)
        rtts: list[float] = []
        with socket.create_connection(("127.0.0.1", host_port), timeout=30) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(args.pings):
                t0 = time.perf_counter()
                sock.sendall(b"x")
                assert sock.recv(64) == b"x"
                rtts.append((time.perf_counter() - t0) * 1000)
        echo_thread.join(60)
        out["forward_rtt_p50_ms"] = round(statistics.median(rtts), 3)
        out["forward_rtt_p99_ms"] = round(sorted(rtts)[int(len(rtts) * 0.99) - 1], 3)
        log(f"forward round trip p50 {out['forward_rtt_p50_ms']} ms")
    finally:
        stop.set()
        if thread is not None:
            thread.join(10)
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()
        for rt in runtimes:
            with contextlib.suppress(Exception):
                hv.destroy(rt)
        with contextlib.suppress(Exception):
            netplumb.teardown_host(host)
        netns.remove(host_ns)
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
