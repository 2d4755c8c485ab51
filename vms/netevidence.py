"""A VM's egress evidence as its page shows it: the last periods of ``net.egress_refused`` and
``net.dns_lookups`` (appended by ``vms.commands.record_net_evidence``), newest first, one row per
period with the refused connections and the allowed and refused names, each with its count.

Reads the event log (the caller records the read: ``audit.commands.record_trail_read``). The
payloads are the collector's, but the names and addresses in them come from the guest's
traffic: every value is read defensively and shown as text.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from audit import store
from audit.models import Event
from vms.models import VirtualMachine

__all__ = ["EVIDENCE_TYPES", "Period", "RefusedConnection", "periods"]

EVIDENCE_TYPES = ("net.egress_refused", "net.dns_lookups")
# The page shows this many periods; older ones are in the VM's timeline and the audit trail.
DEFAULT_PERIODS = 20


@dataclass(frozen=True)
class RefusedConnection:
    dst: str
    proto: str
    port: int | None
    packets: int


@dataclass
class Period:
    """One collection period of a VM: what its policy refused and what its resolver answered."""

    since: str
    until: str
    positions: list[int] = field(default_factory=list)
    refused: list[RefusedConnection] = field(default_factory=list)
    refused_more: int = 0
    allowed_names: list[tuple[str, int]] = field(default_factory=list)
    refused_names: list[tuple[str, int]] = field(default_factory=list)
    names_more: int = 0

    @property
    def refused_packets(self) -> int:
        return sum(r.packets for r in self.refused)

    @property
    def start(self) -> dt.datetime | None:
        return _instant(self.since)

    @property
    def end(self) -> dt.datetime | None:
        return _instant(self.until)


def _instant(text: str) -> dt.datetime | None:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if value.tzinfo is None:
        return None
    return value.astimezone(dt.UTC)


def _int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def _counts(value: Any) -> list[tuple[str, int]]:
    """A ``{name: count}`` payload as (name, count) rows, biggest first."""
    if not isinstance(value, dict):
        return []
    return sorted(((str(k), _int(v)) for k, v in value.items()), key=lambda i: (-i[1], i[0]))


def _refused(value: Any) -> list[RefusedConnection]:
    rows = []
    for r in value if isinstance(value, list) else []:
        if not isinstance(r, dict):
            continue
        port = r.get("port")
        rows.append(
            RefusedConnection(
                dst=str(r.get("dst", "")),
                proto=str(r.get("proto", "")),
                port=_int(port) if port is not None else None,
                packets=_int(r.get("packets")),
            )
        )
    return sorted(rows, key=lambda r: -r.packets)


def _apply(period: Period, event: store.RecordedEvent, data: dict[str, Any]) -> None:
    period.positions.append(event.position)
    if event.type == "net.egress_refused":
        period.refused.extend(_refused(data.get("refused")))
        period.refused_more += _int(data.get("more"))
    else:
        period.allowed_names.extend(_counts(data.get("allowed")))
        period.refused_names.extend(_counts(data.get("refused")))
        period.names_more += _int(data.get("more"))


def periods(vm: VirtualMachine, *, limit: int = DEFAULT_PERIODS) -> list[Period]:
    """The VM's last ``limit`` evidence periods, newest first. The collector appends a period's
    two events together with the same ``since`` and ``until``, so at most ``2 * limit`` events
    make ``limit`` periods."""
    rows = list(
        Event.objects.filter(aggregate_type="vm", aggregate_id=str(vm.pk), type__in=EVIDENCE_TYPES)
        .order_by("-position")
        .values_list(*store.COLUMNS)[: 2 * limit]
    )
    found: dict[tuple[str, str], Period] = {}
    for row in rows:
        event = store.RecordedEvent.from_row(row)
        payload = event.data
        data = payload if isinstance(payload, dict) else {}
        key = (str(data.get("since", "")), str(data.get("until", "")))
        if key not in found:
            if len(found) == limit:
                break
            found[key] = Period(since=key[0], until=key[1])
        _apply(found[key], event, data)
    return list(found.values())
