"""The resolvers guests use: one dnsmasq per VM NIC (that has egress), inside the product
namespace, listening on its network's gateway at a port of its own; the VM's rules (ruleset.py)
send the guest's queries to the gateway's port 53 there.

Why one per VM and not one per network: dnsmasq's ``nftset=`` is per domain, not per client, and
its ``server=``/``address=`` choices are global too. With one resolver per network, a guest could
resolve (and so tunnel data through) any name another VM of the network may resolve, and its
lookups of names it may not use could not be refused. One small process per VM (about a megabyte
of memory, no cache) makes the policy exact:
- ``allow-list``: the allowed names (and their subdomains) are forwarded to the upstream servers
  and their IPv4 answers are added to the VM's nftables set ``vm_<key>_dns``, which its forward
  chain accepts; every other name gets NXDOMAIN from the resolver itself and never leaves;
- ``internet``: every name is forwarded; no set is filled (the VM may reach any address anyway);
- ``none``: no resolver at all (the VM's queries are refused and counted like any connection).

Each resolver logs its queries (``log-queries=extra``) to a file of its own; ``read_queries``
turns the log into lookups with a verdict, from an offset, for aggregated audit events.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .names import (
    NetworkError,
    check_domain,
    check_ipv4,
    check_ipv4_network,
    check_key,
    check_netns,
    check_port,
)
from .netns import run
from .ruleset import DEFAULT_TABLE, _check_table

__all__ = [
    "DNSMASQ",
    "Lookup",
    "Resolver",
    "paths",
    "read_queries",
    "resolver_keys",
    "resolver_port",
    "remove_log",
    "render_config",
    "running",
    "start",
    "stop",
]

DNSMASQ = "/usr/sbin/dnsmasq"
# Resolver ports on a gateway: the base plus the guest's index in its subnet, so no allocation
# is needed (a gateway belongs to one network, an index to one guest of it).
RESOLVER_PORT_BASE = 40000
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Resolver:
    """VM ``key``'s resolver: on ``gateway``:``port``, forwarding to ``upstreams``; ``domains``
    are the allowed names in ``allow-list`` mode (ignored for ``internet``)."""

    key: str
    gateway: ipaddress.IPv4Address
    port: int
    mode: Literal["allow-list", "internet"]
    upstreams: tuple[ipaddress.IPv4Address, ...]
    domains: tuple[str, ...] = ()
    table: str = DEFAULT_TABLE

    def __post_init__(self) -> None:
        check_key(self.key)
        check_ipv4(self.gateway)
        check_port(self.port)
        if self.port == 53:
            raise NetworkError(
                "port 53 on the gateway is the redirect target's source, not a resolver"
            )
        if self.mode not in ("allow-list", "internet"):
            raise NetworkError(f"a resolver serves allow-list or internet, not {self.mode!r}")
        if not self.upstreams:
            raise NetworkError("a resolver needs an upstream server")
        for upstream in self.upstreams:
            check_ipv4(upstream)
        object.__setattr__(self, "domains", tuple(sorted({check_domain(d) for d in self.domains})))
        _check_table(self.table)


def resolver_port(subnet: ipaddress.IPv4Network, address: ipaddress.IPv4Address) -> int:
    """The port of the resolver of the guest at ``address`` on its network's gateway."""
    check_ipv4_network(subnet)
    if check_ipv4(address) not in subnet:
        raise NetworkError(f"{address} is not in {subnet}")
    port = RESOLVER_PORT_BASE + int(address) - int(subnet.network_address)
    if port > 65535:
        raise NetworkError(f"{subnet} is too large for per-guest resolver ports")
    return port


@dataclass(frozen=True)
class Paths:
    config: Path
    pid: Path
    log: Path


def paths(run_dir: Path, key: str) -> Paths:
    base = Path(run_dir) / f"dns-{check_key(key)}"
    return Paths(base.with_suffix(".conf"), base.with_suffix(".pid"), base.with_suffix(".log"))


def render_config(resolver: Resolver, run_dir: Path) -> str:
    p = paths(run_dir, resolver.key)
    lines = [
        f"port={resolver.port}",
        f"listen-address={resolver.gateway}",
        # Bind the one address (several resolvers share the gateway, each on its own port) and
        # never the wildcard, so nothing else in the namespace answers.
        "bind-interfaces",
        "no-resolv",
        "no-hosts",
        "no-poll",
        "no-negcache",
        # No cache: every answer comes from upstream, so every answer fills the set again even
        # after the VM's rules were replaced.
        "cache-size=0",
        "filter-AAAA",
        "log-queries=extra",
        f"log-facility={p.log}",
        f"pid-file={p.pid}",
    ]
    if resolver.mode == "internet":
        lines += [f"server={u}" for u in resolver.upstreams]
    else:
        nft_set = f"4#inet#{resolver.table}#vm_{resolver.key}_dns"
        # Everything not listed below: NXDOMAIN from here (more specific domains win).
        lines.append("address=/#/")
        for domain in resolver.domains:
            lines += [f"server=/{domain}/{u}" for u in resolver.upstreams]
            lines.append(f"nftset=/{domain}/{nft_set}")
    return "\n".join(lines) + "\n"


def running(run_dir: Path, key: str) -> int | None:
    """The pid of VM ``key``'s resolver, when its pidfile names a live dnsmasq started with its
    configuration (a pid alone is not an identity: pids are reused)."""
    p = paths(run_dir, key)
    try:
        pid = int(p.pid.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    if cmdline and cmdline[0] == DNSMASQ.encode() and f"--conf-file={p.config}".encode() in cmdline:
        return pid
    return None


def start(ns: str, resolver: Resolver, run_dir: Path) -> int:
    """(Re)start VM ``resolver.key``'s resolver in namespace ``ns``; returns its pid. dnsmasq
    reads its configuration only at start, so a changed policy is a restart."""
    check_netns(ns)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    stop(run_dir, resolver.key)
    p = paths(run_dir, resolver.key)
    p.config.write_text(render_config(resolver, run_dir))
    p.pid.unlink(missing_ok=True)
    # The log is created here, owned by root and readable by the product; dnsmasq appends to it
    # after dropping its privileges (it keeps CAP_NET_ADMIN for the nftables sets).
    p.log.touch(mode=0o640, exist_ok=True)
    with contextlib.suppress(PermissionError):
        os.chown(p.log, _nobody_uid(), -1)
    run(ns, [DNSMASQ, f"--conf-file={p.config}"])
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        pid = running(run_dir, resolver.key)
        if pid is not None:
            return pid
        time.sleep(0.02)
    raise NetworkError(f"the resolver of {resolver.key} did not start (see {p.log})")


def stop(run_dir: Path, key: str) -> None:
    """Stop VM ``key``'s resolver if it runs and remove its configuration and pidfile (the log
    stays until the caller has read it: ``remove_log``)."""
    p = paths(run_dir, key)
    pid = running(run_dir, key)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.02)
        if Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    p.config.unlink(missing_ok=True)
    p.pid.unlink(missing_ok=True)


def resolver_keys(run_dir: Path) -> set[str]:
    """Keys of the VMs whose resolver has a configuration in ``run_dir`` (running or not), for
    the reconciler to find orphans."""
    keys = set()
    for conf in Path(run_dir).glob("dns-*.conf"):
        key = conf.stem.removeprefix("dns-")
        with contextlib.suppress(NetworkError):
            keys.add(check_key(key))
    return keys


def remove_log(run_dir: Path, key: str) -> None:
    paths(run_dir, key).log.unlink(missing_ok=True)


def _nobody_uid() -> int:
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534


@dataclass(frozen=True)
class Lookup:
    """One query a guest made: the name, the record type, the client and whether the resolver
    forwarded it (``allowed``) or answered it itself with a refusal (``refused``)."""

    name: str
    qtype: str
    client: ipaddress.IPv4Address
    verdict: Literal["allowed", "refused"]


# log-queries=extra lines: "<date> dnsmasq[pid]: <serial> <client>/<port> <what> <name> ..."
_LINE = re.compile(
    r"dnsmasq\[\d+\]: (?P<serial>\d+) (?P<client>[0-9.]+)/\d+ "
    r"(?P<what>query\[(?P<qtype>[A-Za-z0-9]+)\]|forwarded|config|reply|cached) (?P<name>\S+)"
    r"(?: is (?P<answer>\S+))?"
)


def read_queries(run_dir: Path, key: str, offset: int = 0) -> tuple[list[Lookup], int]:
    """Lookups logged by VM ``key``'s resolver after byte ``offset``; returns them and the
    offset to continue from (a partly written last line is left for the next read)."""
    log = paths(run_dir, key).log
    try:
        with open(log, "rb") as fh:
            if os.fstat(fh.fileno()).st_size < offset:
                offset = 0  # a new log (the old one was removed or truncated): from its start
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], 0
    end = data.rfind(b"\n") + 1
    pending: dict[str, tuple[str, str, str]] = {}
    verdicts: dict[str, str] = {}
    order: list[str] = []
    for line in data[:end].decode(errors="replace").splitlines():
        match = _LINE.search(line)
        if match is None:
            continue
        serial = match["serial"]
        if match["qtype"]:
            if serial not in pending:
                order.append(serial)
            pending[serial] = (match["name"].lower(), match["qtype"], match["client"])
        elif match["what"] == "forwarded":
            verdicts.setdefault(serial, "allowed")
        elif match["what"] == "config":
            # NXDOMAIN is the answer for every name that is not allowed (address=/#/); other
            # answers from the configuration (filter-AAAA's empty one) concern allowed names.
            verdicts.setdefault(serial, "refused" if match["answer"] == "NXDOMAIN" else "allowed")
    lookups = []
    for serial in order:
        name, qtype, client = pending[serial]
        # A query dnsmasq neither forwarded nor answered from its configuration was dropped
        # (filter-AAAA, a malformed name): the guest got no address, so it counts as refused.
        verdict = verdicts.get(serial, "refused")
        lookups.append(Lookup(name, qtype, ipaddress.IPv4Address(client), verdict))  # type: ignore[arg-type]
    return lookups, offset + end
