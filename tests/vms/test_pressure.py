"""The pressure loop's decisions (vms.pressure.decide), on the real code with readings passed in:
low first, high never, opt-out, hysteresis, escalation, give-back order and hold time."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest

from vms import pressure
from vms.pressure import Candidate, Readings, Thresholds

T = Thresholds(
    available_mib=1024,
    psi=10.0,
    release_available_mib=2048,
    release_psi=1.0,
    fraction=0.5,
    min_guest_mib=128,
    hold_s=60.0,
    escalate_s=30.0,
)
PRESSED = Readings(available_mib=500, memory_psi=0.0)
PSI_PRESSED = Readings(available_mib=20000, memory_psi=25.0)
CALM = Readings(available_mib=20000, memory_psi=0.0)
BETWEEN = Readings(available_mib=1500, memory_psi=0.0)
NOW = 1_000_000.0


def vm(priority: str, *, opt_out: bool = False, target: int | None = None, at: float | None = None):
    return Candidate(uuid.uuid4(), priority, opt_out, 512, target, at)


def kinds(actions: list[pressure.Action]) -> dict[uuid.UUID, tuple[str, int | None]]:
    return {a.vm_id: (a.kind, a.target) for a in actions}


def test_under_memory_pressure_only_the_low_priority_vms_are_ballooned() -> None:
    low, normal, high = vm("low"), vm("normal"), vm("high")
    actions = pressure.decide(PRESSED, [high, normal, low], T, NOW)
    assert kinds(actions) == {low.vm_id: ("balloon", 256)}
    assert "memory available 500 MiB < 1024 MiB" in actions[0].reason


def test_psi_above_its_threshold_is_pressure_too() -> None:
    low = vm("low")
    actions = pressure.decide(PSI_PRESSED, [low], T, NOW)
    assert kinds(actions) == {low.vm_id: ("balloon", 256)}
    assert "PSI some avg10 25.00 > 10" in actions[0].reason


def test_an_opted_out_vm_is_never_ballooned() -> None:
    low = vm("low", opt_out=True)
    assert pressure.decide(PRESSED, [low], T, NOW) == []


def test_high_priority_is_never_ballooned_even_when_nothing_else_is_left() -> None:
    high = vm("high")
    assert pressure.decide(PRESSED, [high], T, NOW) == []


def test_normal_waits_while_the_low_balloons_are_young() -> None:
    low = vm("low", target=256, at=NOW - 5)
    normal = vm("normal")
    assert pressure.decide(PRESSED, [low, normal], T, NOW) == []


def test_pressure_that_outlasts_the_low_balloons_reaches_normal() -> None:
    low = vm("low", target=256, at=NOW - 31)
    normal = vm("normal")
    assert kinds(pressure.decide(PRESSED, [low, normal], T, NOW)) == {
        normal.vm_id: ("balloon", 256)
    }


def test_with_no_low_vm_normal_is_ballooned_at_once() -> None:
    normal = vm("normal")
    assert kinds(pressure.decide(PRESSED, [normal], T, NOW)) == {normal.vm_id: ("balloon", 256)}


def test_a_balloon_never_takes_a_guest_below_the_minimum() -> None:
    small = Candidate(uuid.uuid4(), "low", False, 200, None, None)
    tiny = Candidate(uuid.uuid4(), "low", False, 128, None, None)
    assert kinds(pressure.decide(PRESSED, [small, tiny], T, NOW)) == {small.vm_id: ("balloon", 128)}


def test_between_the_thresholds_nothing_moves() -> None:
    low = vm("low")
    held = vm("low", target=256, at=NOW - 3600)
    assert pressure.decide(BETWEEN, [low, held], T, NOW) == []


def test_when_calm_memory_comes_back_after_the_hold_time() -> None:
    young = vm("low", target=256, at=NOW - 10)
    old = vm("low", target=256, at=NOW - 61)
    actions = pressure.decide(CALM, [young, old], T, NOW)
    assert kinds(actions) == {old.vm_id: ("release", 512)}


def test_normal_gets_its_memory_back_before_low() -> None:
    low = vm("low", target=256, at=NOW - 600)
    normal = vm("normal", target=256, at=NOW - 600)
    assert kinds(pressure.decide(CALM, [low, normal], T, NOW)) == {normal.vm_id: ("release", 512)}
    assert kinds(pressure.decide(CALM, [low], T, NOW)) == {low.vm_id: ("release", 512)}


def test_opting_out_or_becoming_high_gives_memory_back_even_under_pressure() -> None:
    out = vm("low", opt_out=True, target=256, at=NOW)
    high = vm("high", target=256, at=NOW)
    actions = pressure.decide(PRESSED, [out, high], T, NOW)
    assert kinds(actions) == {out.vm_id: ("release", 512), high.vm_id: ("release", 512)}
    assert {a.reason for a in actions} == {"opted out", "priority high"}


def test_unreadable_readings_are_not_pressure() -> None:
    low = vm("low")
    assert pressure.decide(Readings(None, None), [low], T, NOW) == []


@pytest.mark.parametrize(
    ("meminfo", "psi", "expected"),
    [
        (
            "MemTotal: 2097152 kB\nMemAvailable: 524288 kB\n",
            "some avg10=12.50 avg60=1.00",
            (512, 12.5),
        ),
        ("MemTotal: 2097152 kB\nMemAvailable: 524288 kB\n", None, (512, None)),
    ],
)
def test_readings_come_from_proc(tmp_path: Path, meminfo: str, psi: str | None, expected) -> None:
    (tmp_path / "meminfo").write_text(meminfo)
    (tmp_path / "loadavg").write_text("0.10 0.10 0.10 1/100 1\n")
    if psi is not None:
        (tmp_path / "pressure").mkdir()
        (tmp_path / "pressure" / "memory").write_text(psi + " total=1\nfull avg10=0.00\n")
        (tmp_path / "pressure" / "cpu").write_text("some avg10=0.00\n")
    r = pressure.read(tmp_path)
    assert (r.available_mib, r.memory_psi) == expected
    assert r.memory_mib == 2048


# --- CPU -------------------------------------------------------------------------------------

CPU_PRESSED = Readings(available_mib=20000, memory_psi=0.0, cpu_psi=80.0)
CPU_CALM = Readings(available_mib=20000, memory_psi=0.0, cpu_psi=5.0)
CPU_BETWEEN = Readings(available_mib=20000, memory_psi=0.0, cpu_psi=30.0)
TC = dataclasses.replace(T, cpu_psi=50.0, release_cpu_psi=20.0, cpu_weight=10)


def test_under_cpu_pressure_only_low_vms_get_a_lower_cpu_weight() -> None:
    low, normal, high = vm("low"), vm("normal"), vm("high")
    out = vm("low", opt_out=True)
    actions = pressure.decide(CPU_PRESSED, [low, normal, high, out], TC, NOW)
    assert kinds(actions) == {low.vm_id: ("cpu_lower", 10)}
    assert "CPU PSI some avg10 80.00 > 50" in actions[0].reason


def test_cpu_weight_comes_back_when_calm_after_the_hold_not_in_between() -> None:
    young = Candidate(uuid.uuid4(), "low", False, 512, cpu_weight=10, cpu_lowered_at=NOW - 5)
    old = Candidate(uuid.uuid4(), "low", False, 512, cpu_weight=10, cpu_lowered_at=NOW - 61)
    assert pressure.decide(CPU_BETWEEN, [young, old], TC, NOW) == []
    assert kinds(pressure.decide(CPU_CALM, [young, old], TC, NOW)) == {
        old.vm_id: ("cpu_restore", None)
    }


def test_a_raised_priority_gets_its_cpu_weight_back_at_once() -> None:
    raised = Candidate(uuid.uuid4(), "normal", False, 512, cpu_weight=10, cpu_lowered_at=NOW)
    actions = pressure.decide(CPU_PRESSED, [raised], TC, NOW)
    assert kinds(actions) == {raised.vm_id: ("cpu_restore", None)}
    assert actions[0].reason == "priority normal"


def test_no_cpu_reading_means_no_cpu_action() -> None:
    low = Candidate(uuid.uuid4(), "low", False, 512, cpu_weight=10, cpu_lowered_at=0.0)
    assert pressure.decide(Readings(20000, 0.0), [low, vm("low")], TC, NOW) == []
