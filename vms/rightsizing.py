"""Right-sizing: what a VM's usage history says about its shape, as recommendations its owner
applies with a resize (never applied here).

From the last ``WINDOW_S`` of history at an hour's step (``vms.usage.series``), once at least
``MIN_HOURS`` of it exist:

- **Memory never used**: the VMM's resident memory (guest RAM the guest touched, plus QEMU's own,
  so it over-states the guest's use: the advice errs on the generous side) never reached half of
  what the VM was given: recommend its peak plus a quarter, in 64 MiB steps, at least 128 MiB.
- **Always CPU-bound**: the VMM's CPU, averaged per hour, stayed at or above ``BOUND_PCT`` % of
  every vCPU for most hours (``BOUND_SHARE``): recommend one more vCPU (up to the system's limit).
- **Idle vCPUs**: with more than one vCPU, the hourly peak never used more than a quarter of
  them: recommend what the peak used, plus a quarter, rounded up.

Each recommendation says why, with the numbers. Nothing here writes: the figures are read.
"""

from __future__ import annotations

import math
import time
from typing import Any

from django.conf import settings

from vms import usage
from vms.models import VirtualMachine

WINDOW_S = 7 * 86_400
STEP_S = 3600
MIN_HOURS = 6  # less history than this: no advice yet
BOUND_PCT = 90.0  # % of one core per vCPU
BOUND_SHARE = 0.75  # of the hours with samples
MIB = 2**20
MEM_STEP_MIB = 64
MEM_MIN_MIB = 128


def recommend(vm: VirtualMachine, now: float | None = None) -> dict[str, Any]:
    """The VM's recommendations (possibly none) and the figures they came from."""
    now = time.time() if now is None else now
    end = int(now) // STEP_S * STEP_S + STEP_S
    start = end - WINDOW_S
    points = usage.series([vm.pk], start, end, STEP_S, now=now)["points"]
    cpu = [p["cpu"] for p in points if p.get("cpu")]
    mem = [p["mem"] for p in points if p.get("mem")]
    hours = len(cpu)
    answer: dict[str, Any] = {
        "window_hours": WINDOW_S // 3600,
        "hours_of_history": hours,
        "current": {"vcpus": vm.vcpus, "memory_mib": vm.memory_mib},
        "figures": {
            "cpu_avg_pct": round(sum(c["avg"] for c in cpu) / hours, 1) if hours else None,
            "cpu_peak_pct": max((c["max"] for c in cpu), default=None),
            "memory_peak_mib": round(max(m["max"] for m in mem) / MIB, 1) if mem else None,
        },
        "recommendations": [],
    }
    if hours < MIN_HOURS:
        answer["note"] = f"at least {MIN_HOURS} hours of history are needed; there are {hours}"
        return answer
    recs: list[dict[str, Any]] = answer["recommendations"]
    if mem:
        peak_mib = max(m["max"] for m in mem) / MIB
        if peak_mib < vm.memory_mib / 2:
            want = max(MEM_MIN_MIB, math.ceil(peak_mib * 1.25 / MEM_STEP_MIB) * MEM_STEP_MIB)
            if want < vm.memory_mib:
                recs.append(
                    {
                        "resource": "memory_mib",
                        "current": vm.memory_mib,
                        "recommended": want,
                        "why": f"its memory peaked at {peak_mib:.0f} MiB in {hours} h, less than "
                        f"half of the {vm.memory_mib} MiB it has",
                    }
                )
    bound = [c for c in cpu if c["avg"] >= BOUND_PCT * vm.vcpus]
    limit = settings.SANDBOX_MAX_VCPUS_PER_VM
    if len(bound) >= BOUND_SHARE * hours and vm.vcpus < limit:
        recs.append(
            {
                "resource": "vcpus",
                "current": vm.vcpus,
                "recommended": vm.vcpus + 1,
                "why": f"its CPU averaged {BOUND_PCT:.0f} % or more of every vCPU in "
                f"{len(bound)} of {hours} h: it is CPU-bound",
            }
        )
    elif vm.vcpus > 1:
        peak = max(c["max"] for c in cpu)
        if peak <= 25.0 * vm.vcpus:
            want = max(1, math.ceil(peak / 100 * 1.25))
            if want < vm.vcpus:
                recs.append(
                    {
                        "resource": "vcpus",
                        "current": vm.vcpus,
                        "recommended": want,
                        "why": f"its CPU peaked at {peak:.0f} % of one core in {hours} h, a "
                        f"quarter or less of its {vm.vcpus} vCPUs",
                    }
                )
    return answer
