"""An "internet" for networking tests: a namespace behind the product namespace's uplink
``up0`` with a DNS server that knows two names and TCP servers (port 80) at both names'
addresses, on documentation addresses that exist only inside it."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from vms.network import netns

from .conftest import SERVER

INTERNET_DNS = ipaddress.IPv4Address("198.51.100.53")
APP_ADDRESS = ipaddress.IPv4Address("198.51.100.80")
OTHER_HOST = ipaddress.IPv4Address("203.0.113.20")
APP_DOMAIN = "app.example.test"
OTHER_DOMAIN = "other.example.test"
UPLINK = "up0"


@contextlib.contextmanager
def internet(product_ns: str, ns: str, pid_dir: Path) -> Iterator[None]:
    """Create namespace ``ns`` joined to ``product_ns`` by the uplink, with its servers; on exit
    stop them and remove ``ns`` (the uplink goes with it)."""
    netns.create(ns)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        uplink = ipaddress.IPv4Network(f"10.253.{secrets.randbelow(256)}.0/30")
        with netns.iproute(product_ns) as ipr:
            ipr.link(
                "add",
                ifname=UPLINK,
                kind="veth",
                peer={"ifname": "eth0", "net_ns_fd": f"/run/netns/{ns}"},
            )
            (idx,) = ipr.link_lookup(ifname=UPLINK)
            ipr.addr("add", index=idx, address=str(uplink.network_address + 1), prefixlen=30)
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=str(uplink.network_address + 2))
        with netns.iproute(ns) as ipr:
            (idx,) = ipr.link_lookup(ifname="eth0")
            ipr.addr("add", index=idx, address=str(uplink.network_address + 2), prefixlen=30)
            ipr.link("set", index=idx, state="up")
            (lo,) = ipr.link_lookup(ifname="lo")
            for address in (INTERNET_DNS, APP_ADDRESS, OTHER_HOST):
                ipr.addr("add", index=lo, address=str(address), prefixlen=32)
            ipr.route("add", dst="0.0.0.0/0", gateway=str(uplink.network_address + 1))
        procs.append(
            subprocess.Popen(  # noqa: S603 - fixed argv
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "/usr/sbin/dnsmasq",
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    f"--listen-address={INTERNET_DNS}",
                    "--port=53",
                    "--cache-size=0",
                    f"--address=/{APP_DOMAIN}/{APP_ADDRESS}",
                    f"--address=/{OTHER_DOMAIN}/{OTHER_HOST}",
                    f"--pid-file={pid_dir}/internet-dns.pid",
                    "--log-facility=-",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        for address in (APP_ADDRESS, OTHER_HOST):
            proc = subprocess.Popen(  # noqa: S603 - fixed argv
                ["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, str(address), "80"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            procs.append(proc)
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        yield
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        netns.remove(ns)
