"""Quotas (per user, inherited per resource from groups, then the defaults), team budgets
(a group's shared limits) and system limits.

Usage is checked inside the command's transaction after the event store lock is taken, so two
concurrent requests are checked one after the other against committed usage: together they can
never exceed a limit.

A team budget (``GroupBudget``) is what the VMs charged to one group hold together. Each VM
draws from at most one budget, recorded at its create (``VirtualMachine.budget_group``): the
one the request names, else the creator's only group with a budget; a creator in several such
groups must name one (``choose_budget``). The VM's resizes and snapshots are charged to the same
budget, and it stays charged there until destroyed, whoever belongs to the group by then. The
creator's own limits (``effective_quota``) apply as well: a request must fit both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db.models import Count, IntegerField, Max, OuterRef, Q, Subquery, Sum, Value

from core.compiled import CompiledQuery, cached
from vms import lifecycle
from vms.models import GroupBudget, Quota, Snapshot, Usage, VirtualMachine

RESOURCES = ("vms", "vcpus", "memory_mib", "disk_mib", "snapshots")


class QuotaExceeded(Exception):
    """A named quota or limit refuses the request."""

    def __init__(
        self,
        quota: str,
        limit: int,
        used: int,
        requested: int,
        scope: str = "user",
        group: str | None = None,
    ) -> None:
        self.quota, self.limit, self.used, self.requested, self.scope = (
            quota,
            limit,
            used,
            requested,
            scope,
        )
        self.group = group  # the group of a team budget (scope "group")
        whose = f"group {group}'s team quota" if group is not None else f"{scope} quota"
        super().__init__(
            f"{whose} {quota} exceeded: {used} in use + {requested} requested > limit {limit}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "detail": str(self),
            "quota": self.quota,
            "scope": self.scope,
            **({"group": self.group} if self.group is not None else {}),
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


def check(
    user: Any,
    *,
    quota: EffectiveQuota | None = None,
    budget_group_id: int | None = None,
    **requested: int,
) -> None:
    """Raise QuotaExceeded unless ``user`` may add ``requested`` (resource -> amount), and,
    when ``budget_group_id`` is given, the team budget of that group may too.

    ``quota``: the user's limits when already read; a command reads them before it takes the
    event store's lock, so that the lock is held only for reading usage (what concurrent
    requests change) and appending. A budget's limits are read with its usage, under the lock.
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
    if budget_group_id is not None:
        check_budget(budget_group_id, **requested)


# --- Team budgets ------------------------------------------------------------------------------

# Snapshots that count: as the usage projection counts them (requested until failed or deleted).
COUNTED_SNAPSHOTS = (Snapshot.State.CREATING, Snapshot.State.READY, Snapshot.State.CORRUPTED)
GROUP_STAND_IN = -5_128_903_377


def budgets_of(user: Any) -> list[GroupBudget]:
    """The team budgets of ``user``'s groups, by group name."""
    return list(
        GroupBudget.objects.filter(group__in=user.groups.all())
        .select_related("group")
        .order_by("group__name")
    )


def choose_budget(user: Any, name: str | None) -> GroupBudget | None:
    """The team budget a new VM of ``user`` draws from: the group named ``name`` (one of the
    user's groups with a budget), else the user's only such group, else none. A user in several
    groups with a budget must name one: ValidationError on ``budget``, nothing guessed."""
    budgets = budgets_of(user)
    if name:
        for b in budgets:
            if b.group.name == name:
                return b
        raise ValidationError(
            {"budget": f"{name!r} is not one of your groups with a team budget"}
            if budgets
            else {"budget": f"{name!r}: you are in no group with a team budget"}
        )
    if len(budgets) > 1:
        names = ", ".join(b.group.name for b in budgets)
        raise ValidationError(
            {
                "budget": f"you are in several groups with a team budget ({names}): "
                "name the one this VM draws from"
            }
        )
    return budgets[0] if budgets else None


@cached
def _budget_query() -> CompiledQuery:
    """A group's budget limits and what its VMs (not destroyed) and their counted snapshots hold,
    in one row; no row when the group has no budget (compiled once: it runs under the lock)."""
    live = (
        VirtualMachine.objects.filter(budget_group_id=OuterRef("group_id"))
        .exclude(state=lifecycle.GONE)
        .order_by()
        .values("budget_group_id")
    )
    snaps = (
        Snapshot.objects.filter(
            vm__budget_group_id=OuterRef("group_id"), state__in=COUNTED_SNAPSHOTS
        )
        .order_by()
        .values("vm__budget_group_id")
    )

    def total(qs: Any, expression: Any) -> Subquery:
        return Subquery(qs.annotate(n=expression).values("n"), output_field=IntegerField())

    qs = GroupBudget.objects.filter(group_id=GROUP_STAND_IN).values(
        "group__name",
        *(f"max_{r}" for r in RESOURCES),
        used_vms=total(live, Count("pk")),
        used_vcpus=total(live, Sum("vcpus")),
        used_memory_mib=total(live, Sum("memory_mib")),
        used_disk_mib=total(live, Sum("disk_mib")),
        used_snapshots=total(snaps, Count("pk")),
    )
    return CompiledQuery(qs, {"group": GROUP_STAND_IN})


@dataclass(frozen=True)
class BudgetState:
    """A team budget's limits (None: no team limit) and what its VMs hold now."""

    group: str
    group_id: int
    limits: dict[str, int | None]
    used: dict[str, int]

    def remaining(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for r in RESOURCES:
            limit = self.limits[r]
            out[r] = None if limit is None else max(0, limit - self.used[r])
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "group_id": self.group_id,
            "limits": dict(self.limits),
            "used": dict(self.used),
            "remaining": self.remaining(),
        }


def budget_state(group_id: int) -> BudgetState | None:
    rows = _budget_query().run(group=group_id)
    if not rows:
        return None
    row = rows[0]
    return BudgetState(
        group=row["group__name"],
        group_id=group_id,
        limits={r: row[f"max_{r}"] for r in RESOURCES},
        used={r: row[f"used_{r}"] or 0 for r in RESOURCES},
    )


def check_budget(group_id: int, **requested: int) -> None:
    """Raise QuotaExceeded (scope ``group``, naming the group) unless the team budget of
    ``group_id`` may add ``requested``; a group whose budget is gone limits nothing. Call it
    under the event store's lock."""
    state = budget_state(group_id)
    if state is None:
        return
    for resource, amount in requested.items():
        limit = state.limits[resource]
        used = state.used[resource]
        if amount > 0 and limit is not None and used + amount > limit:
            raise QuotaExceeded(resource, limit, used, amount, scope="group", group=state.group)


# --- What a user sees -------------------------------------------------------------------------


def limits_set(
    *, user: Any = None, group: Any = None, budget_of: Any = None
) -> dict[str, int | None]:
    """The limits set at one level (None: empty): a user's quota, a group's per-member quota or
    a group's team budget."""
    if budget_of is not None:
        row: Quota | GroupBudget | None = GroupBudget.objects.filter(group=budget_of).first()
    elif user is not None:
        row = Quota.objects.filter(user=user).first()
    else:
        row = Quota.objects.filter(group=group).first()
    return {r: (getattr(row, f"max_{r}") if row is not None else None) for r in RESOURCES}


def quota_report(user: Any) -> dict[str, Any]:
    """What ``GET /api/v1/quotas/me/`` and the dashboard show ``user``: its own limits and
    where each comes from, its usage, its groups' team budgets, the budget its new VMs draw
    from by default, and what a new VM may still take, with the level that limits it."""
    quota = effective_quota(user)
    used = usage_of(user)
    budgets = [s for b in budgets_of(user) if (s := budget_state(b.group_id)) is not None]
    default = budgets[0] if len(budgets) == 1 else None
    remaining: dict[str, int | None] = {}
    limited_by: dict[str, str] = {}
    for r in RESOURCES:
        limit = getattr(quota, r)
        mine = None if limit is None else max(0, limit - used[r])
        team = default.remaining()[r] if default is not None else None
        if team is not None and (mine is None or team < mine):
            remaining[r], limited_by[r] = team, "budget"
        else:
            remaining[r], limited_by[r] = mine, quota.sources[r]
    return {
        "quota": quota.as_dict(),
        "used": used,
        "budgets": [b.as_dict() for b in budgets],
        "budget": default.group if default is not None else None,
        "remaining": remaining,
        "limited_by": limited_by,
    }
