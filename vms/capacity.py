"""Host capacity and overcommit: what the hosts have, what VMs are committed to them, what the
hosts really use, and the check that refuses a request past the overcommitted capacity.

- *Capacity*: each worker measures its host (CPUs, memory, and what is really used: available
  memory, load, pressure) on every heartbeat it runs, into the host's ``HostCapacity`` row.
- *Committed*: the vCPUs and memory of the VMs placed on a host in a state that holds them
  (``lifecycle.HOLDS_HOST``), summed from the VMs; a VM suspended to disk (paused with no VMM,
  ``suspended_to_disk``: vms.idle) holds none, and its resume is checked like a start.
- *Limit*: ``cpus x SANDBOX_CPU_OVERCOMMIT`` vCPUs and ``(memory - SANDBOX_HOST_RESERVED_MEMORY_MIB)
  x SANDBOX_MEMORY_OVERCOMMIT`` MiB, rounded down.

A create has no host yet: it is checked against the cluster, the sum over the hosts measured
within ``SANDBOX_WORKER_STALE_S`` (their committed VMs and those not placed yet that are
being started: ``lifecycle.HOLDS_UNPLACED``). A start and a
resize up of a VM that holds its host are checked against its host when that host is measured,
else against the cluster. When no host has been measured (no worker ran yet), nothing is refused:
there is nothing to compare with. Checks run under the event store's lock, after the quotas, and
raise ``CapacityExceeded`` (a ``QuotaExceeded`` of scope ``host``) before anything is appended.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db.models import Q, Sum
from django.utils import timezone

from vms import lifecycle, runtime
from vms.models import HostCapacity, VirtualMachine
from vms.quotas import QuotaExceeded

__all__ = [
    "CapacityExceeded",
    "HostReport",
    "check_cluster",
    "check_host",
    "limits",
    "measure",
    "record",
    "report",
]

PROC = Path("/proc")
_MAX_MIB = 2**31 - 1  # the columns' range; a larger reading is not believed


class CapacityExceeded(QuotaExceeded):
    """A request would take a host (``host``) or the cluster (``host`` None) past its capacity."""

    def __init__(
        self, resource: str, capacity: int, committed: int, requested: int, host: str | None
    ) -> None:
        super().__init__(resource, capacity, committed, requested, scope="host")
        self.host = host
        where = f"host {host}" if host is not None else "the cluster"
        self.args = (
            f"{where} has no room: {resource} {committed} committed + {requested} requested > "
            f"capacity {capacity} (after overcommit)",
        )

    def as_dict(self) -> dict[str, Any]:
        return super().as_dict() | {
            "host": self.host,
            "resource": self.quota,
            "capacity": self.limit,
            "committed": self.used,
        }


# --- Measuring --------------------------------------------------------------------------------


def _meminfo_mib(text: str, key: str) -> int | None:
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            parts = rest.split()
            if len(parts) == 2 and parts[0].isdigit() and parts[1] == "kB":
                mib = int(parts[0]) // 1024
                return mib if mib <= _MAX_MIB else None
    return None


def _psi_some_avg10(text: str) -> float | None:
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "some":
            for f in fields[1:]:
                key, _, value = f.partition("=")
                if key == "avg10":
                    try:
                        number = float(value)
                    except ValueError:
                        return None
                    return number if 0.0 <= number <= 100.0 else None
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")[:65536]
    except OSError:
        return None


def measure(proc: Path = PROC) -> dict[str, Any]:
    """This host's capacity and use, from ``os.cpu_count()`` and ``proc``; what cannot be read
    (no PSI on this kernel) is None. Raises RuntimeError when CPUs or MemTotal are unknown."""
    cpus = os.cpu_count()
    meminfo = _read(proc / "meminfo") or ""
    total = _meminfo_mib(meminfo, "MemTotal")
    if not cpus or total is None:
        raise RuntimeError(f"cannot read this host's CPUs ({cpus}) or MemTotal ({total})")
    loadavg = (_read(proc / "loadavg") or "").split()
    try:
        load1: float | None = float(loadavg[0]) if loadavg else None
    except ValueError:
        load1 = None
    cpu_psi, mem_psi = (_read(proc / "pressure" / n) for n in ("cpu", "memory"))
    return {
        "cpus": cpus,
        "memory_mib": total,
        "available_mib": _meminfo_mib(meminfo, "MemAvailable"),
        "load1": load1 if load1 is not None and math.isfinite(load1) else None,
        "cpu_pressure": _psi_some_avg10(cpu_psi) if cpu_psi else None,
        "memory_pressure": _psi_some_avg10(mem_psi) if mem_psi else None,
    }


def record(host: str | None = None, proc: Path = PROC) -> HostCapacity:
    """Measure this host and store it as ``host``'s capacity (the heartbeat's path)."""
    values = measure(proc) | {"measured_at": timezone.now()}
    row, _ = HostCapacity.objects.update_or_create(
        host=host or runtime.host_name(), defaults=values
    )
    return row


# --- Limits and what is committed -------------------------------------------------------------


def limits(cpus: int, memory_mib: int) -> dict[str, int]:
    """What may be committed to a host of ``cpus`` and ``memory_mib``, after overcommit."""
    usable = max(0, memory_mib - settings.SANDBOX_HOST_RESERVED_MEMORY_MIB)
    return {
        "vcpus": math.floor(cpus * settings.SANDBOX_CPU_OVERCOMMIT),
        "memory_mib": math.floor(usable * settings.SANDBOX_MEMORY_OVERCOMMIT),
    }


def _fresh_hosts() -> list[HostCapacity]:
    # As vms.heartbeat judges a worker: measured within the stale time (imported there, not here).
    stale = float(getattr(settings, "SANDBOX_WORKER_STALE_S", 90))
    since = timezone.now() - timedelta(seconds=stale)
    return list(HostCapacity.objects.filter(measured_at__gte=since).order_by("host"))


# A VM suspended to disk (vms.idle) is paused with no VMM: it holds none of its host's vCPUs or
# memory until a resume restores it (which is checked like a start).
_ON_DISK = Q(suspended_to_disk=True)


def _committed(where: Q) -> dict[str, int]:
    row = (
        VirtualMachine.objects.filter(where)
        .exclude(_ON_DISK)
        .order_by()
        .aggregate(vcpus=Sum("vcpus"), memory_mib=Sum("memory_mib"))
    )
    return {"vcpus": row["vcpus"] or 0, "memory_mib": row["memory_mib"] or 0}


def _check(
    capacity: dict[str, int], committed: dict[str, int], host: str | None, requested: dict[str, int]
) -> None:
    for resource, amount in requested.items():
        if amount > 0 and committed[resource] + amount > capacity[resource]:
            raise CapacityExceeded(resource, capacity[resource], committed[resource], amount, host)


def check_cluster(*, vcpus: int, memory_mib: int, hosts: list[HostCapacity] | None = None) -> None:
    """Under the event store's lock: raise CapacityExceeded unless the measured hosts together
    have room for ``vcpus`` and ``memory_mib`` more; no measured host: no refusal.

    ``hosts``: the hosts measured recently, when already read."""
    if hosts is None:
        hosts = _fresh_hosts()
    if not hosts:
        return
    capacity = {"vcpus": 0, "memory_mib": 0}
    for h in hosts:
        for r, n in limits(h.cpus, h.memory_mib).items():
            capacity[r] += n
    committed = _committed(
        Q(host__in=[h.host for h in hosts], state__in=lifecycle.HOLDS_HOST)
        | Q(host="", state__in=lifecycle.HOLDS_UNPLACED)
    )
    _check(capacity, committed, None, {"vcpus": vcpus, "memory_mib": memory_mib})


def check_host(host: str, *, vcpus: int, memory_mib: int) -> None:
    """Under the event store's lock: raise CapacityExceeded unless ``host`` has room for
    ``vcpus`` and ``memory_mib`` more; a host not measured recently: the cluster is checked."""
    hosts = _fresh_hosts()
    row = next((h for h in hosts if h.host == host), None) if host else None
    if row is None:
        check_cluster(vcpus=vcpus, memory_mib=memory_mib, hosts=hosts)
        return
    _check(
        limits(row.cpus, row.memory_mib),
        _committed(Q(host=host, state__in=lifecycle.HOLDS_HOST)),
        host,
        {"vcpus": vcpus, "memory_mib": memory_mib},
    )


# --- What readers of all VMs see --------------------------------------------------------------


@dataclass(frozen=True)
class HostReport:
    """One host: its capacity (None: never measured), what is committed to it, what it really
    uses, and how far its commitments go against its real CPUs and memory."""

    name: str
    measured: HostCapacity | None
    fresh: bool
    committed: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        m = self.measured
        capacity = limits(m.cpus, m.memory_mib) if m is not None else None
        return {
            "name": self.name,
            "fresh": self.fresh,
            "measured_at": m.measured_at.isoformat() if m is not None else None,
            "cpus": m.cpus if m is not None else None,
            "memory_mib": m.memory_mib if m is not None else None,
            "capacity": capacity,
            "committed": dict(self.committed),
            "used": {
                "available_mib": m.available_mib,
                "load1": m.load1,
                "cpu_pressure": m.cpu_pressure,
                "memory_pressure": m.memory_pressure,
            }
            if m is not None
            else None,
            "ratios": {
                "vcpus_per_cpu": round(self.committed["vcpus"] / m.cpus, 2),
                "memory_committed": round(self.committed["memory_mib"] / m.memory_mib, 2),
            }
            if m is not None and m.cpus and m.memory_mib
            else None,
        }


def report() -> dict[str, Any]:
    """Every host measured or holding VMs, by name, with the overcommit settings."""
    measured = {h.host: h for h in HostCapacity.objects.all()}
    fresh = {h.host for h in _fresh_hosts()}
    committed = {
        r["host"]: {"vcpus": r["vcpus"] or 0, "memory_mib": r["memory_mib"] or 0}
        for r in VirtualMachine.objects.filter(state__in=lifecycle.HOLDS_HOST)
        .exclude(host="")
        .exclude(_ON_DISK)
        .order_by()
        .values("host")
        .annotate(vcpus=Sum("vcpus"), memory_mib=Sum("memory_mib"))
    }
    hosts = [
        HostReport(
            name=name,
            measured=measured.get(name),
            fresh=name in fresh,
            committed=committed.get(name, {"vcpus": 0, "memory_mib": 0}),
        )
        for name in sorted(set(measured) | set(committed))
    ]
    return {
        "settings": {
            "cpu_overcommit": settings.SANDBOX_CPU_OVERCOMMIT,
            "memory_overcommit": settings.SANDBOX_MEMORY_OVERCOMMIT,
            "host_reserved_memory_mib": settings.SANDBOX_HOST_RESERVED_MEMORY_MIB,
        },
        "hosts": [h.as_dict() for h in hosts],
    }
