"""Quotas (per user, inherited per resource from groups, then the defaults) and system limits.

Usage is checked inside the command's transaction after the event store lock is taken, so two
concurrent requests are checked one after the other against committed usage: together they can
never exceed a limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db.models import Max, Q, Sum, Value

from core.compiled import CompiledQuery, cached
from vms.models import Quota, Usage

RESOURCES = ("vms", "vcpus", "memory_mib", "disk_mib", "snapshots")


class QuotaExceeded(Exception):
    """A named quota or limit refuses the request."""

    def __init__(
        self, quota: str, limit: int, used: int, requested: int, scope: str = "user"
    ) -> None:
        self.quota, self.limit, self.used, self.requested, self.scope = (
            quota,
            limit,
            used,
            requested,
            scope,
        )
        super().__init__(
            f"{scope} quota {quota} exceeded: {used} in use + {requested} requested > limit {limit}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "detail": str(self),
            "quota": self.quota,
            "scope": self.scope,
            "limit": self.limit,
            "used": self.used,
            "requested": self.requested,
        }


SOURCES = ("user", "group", "default")


@dataclass(frozen=True)
class EffectiveQuota:
    """A user's limit per resource, each with the level it came from (``sources``).

    ``source`` is the most specific level that set any of them.
    """

    vms: int | None
    vcpus: int | None
    memory_mib: int | None
    disk_mib: int | None
    snapshots: int | None
    source: str
    sources: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {r: getattr(self, r) for r in RESOURCES} | {
            "source": self.source,
            "sources": dict(self.sources),
        }


def effective_quota(user: Any) -> EffectiveQuota:
    """Resolve each resource on its own: the user's quota, where it sets the resource; else the
    most generous of the user's groups' quotas that set it; else the system default
    (``SANDBOX_QUOTA_*``). An empty field means "inherit", never "no limit": a user quota that
    sets only ``max_vms`` keeps every other limit of its groups or of the defaults.
    """
    own = Quota.objects.filter(user=user).first()
    group_quotas = list(Quota.objects.filter(group__in=user.groups.all()))
    defaults: Mapping[str, int | None] = settings.SANDBOX_DEFAULT_QUOTA
    values: dict[str, int | None] = {}
    sources: dict[str, str] = {}
    for r in RESOURCES:
        mine = getattr(own, f"max_{r}") if own is not None else None
        set_by_groups = [v for q in group_quotas if (v := getattr(q, f"max_{r}")) is not None]
        if mine is not None:
            values[r], sources[r] = mine, "user"
        elif set_by_groups:
            values[r], sources[r] = max(set_by_groups), "group"
        else:
            values[r], sources[r] = defaults.get(r), "default"
    source = next(s for s in SOURCES if s in sources.values())
    return EffectiveQuota(**values, source=source, sources=sources)  # type: ignore[arg-type]


def usage_of(user: Any) -> dict[str, int]:
    row = Usage.objects.filter(user=user).first()
    return {r: (getattr(row, r) if row else 0) for r in RESOURCES}


def check_vm_shape(vcpus: int, memory_mib: int, disk_mib: int) -> None:
    for name, value, limit in (
        ("max_vcpus_per_vm", vcpus, settings.SANDBOX_MAX_VCPUS_PER_VM),
        ("max_memory_mib_per_vm", memory_mib, settings.SANDBOX_MAX_MEMORY_MIB_PER_VM),
        ("max_disk_mib_per_vm", disk_mib, settings.SANDBOX_MAX_DISK_MIB_PER_VM),
    ):
        if value > limit:
            raise QuotaExceeded(name, limit, 0, value, scope="system")


USER_STAND_IN = -7_319_446_582


@cached
def _usage_query() -> CompiledQuery:
    """Every user's VMs summed and one user's usage, in one row (compiled once: it runs under
    the event store's lock)."""
    mine = Q(user_id=USER_STAND_IN)
    qs = (
        Usage.objects.order_by()
        .annotate(_all=Value(1))
        .values("_all")
        .annotate(system_vms=Sum("vms"), **{r: Max(r, filter=mine) for r in RESOURCES})
    )
    return CompiledQuery(qs, {"user": USER_STAND_IN})


def check(user: Any, *, quota: EffectiveQuota | None = None, **requested: int) -> None:
    """Raise QuotaExceeded unless ``user`` may add ``requested`` (resource -> amount).

    ``quota``: the user's limits when already read; a command reads them before it takes the
    event store's lock, so that the lock is held only for reading usage (what concurrent
    requests change) and appending.
    """
    if quota is None:
        quota = effective_quota(user)
    # The user's usage and the system's VM count in one query over the usage projection (a
    # row per user): its ``vms`` counts exactly the VMs not destroyed, as ACTIVE_STATES does.
    row = _usage_query().run(user=user.pk)[0]
    if requested.get("vms"):
        live = row["system_vms"] or 0
        if live + requested["vms"] > settings.SANDBOX_MAX_VMS:
            raise QuotaExceeded(
                "max_vms", settings.SANDBOX_MAX_VMS, live, requested["vms"], scope="system"
            )
    used = {r: row[r] or 0 for r in RESOURCES}
    for resource, amount in requested.items():
        limit = getattr(quota, resource)
        if amount > 0 and limit is not None and used[resource] + amount > limit:
            raise QuotaExceeded(resource, limit, used[resource], amount)
