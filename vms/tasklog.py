"""The task log: every request on a VM (lifecycle verbs and guest access) with who asked, its
progress and how it ended, as Proxmox's task list shows them.

Rows are the ``Task`` read model (``vms.projectors.TaskProjector``). Who sees a task is who sees
its VM (``vms.policy``): an operator sees every task on its VMs, whoever asked (so it learns that
an admin stopped its VM); readers of all VMs see all. Showing tasks is reading the trail (their
requests are events): the page, the panel and the API record one ``audit.trail_read`` per answer
naming the request events shown; the live pushes of an open page record nothing (the page's
render was the read), as for the VM timeline.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError
from django.db.models import QuerySet

from accounts.caller import Caller
from vms import lifecycle, policy
from vms.models import Task

__all__ = [
    "PAGE_SIZE",
    "STATES",
    "VERBS",
    "Filters",
    "page",
    "task_representation",
    "visible_tasks",
]

PAGE_SIZE = 50
STATES = Task.STATES
VERBS = tuple(v.name for v in lifecycle.VERBS if v.requested and v.kind != "record")
TASK_COLUMNS = (
    "request_event_id", "position", "version", "vm_id", "vm__name", "vm__owner_id",
    "vm__owner__username", "verb", "kind", "actor", "actor_type", "actor_id", "channel",
    "requested_at", "state", "step", "pct", "message", "outcome_type", "error", "finished_at",
)  # fmt: skip


def visible_tasks(caller: Caller) -> QuerySet[Task]:
    qs = Task.objects.all()
    if not policy.sees_all_vms(caller):
        qs = qs.filter(vm__owner_id=caller.user.pk)
    return qs


@dataclass(frozen=True)
class Filters:
    """A task list's filters, validated (a bad one is a ValidationError naming it)."""

    vm: uuid.UUID | None = None
    user: str = ""
    verb: str = ""
    state: str = ""
    before: int | None = None  # keyset: tasks older than this request position

    @classmethod
    def parse(cls, params: Any) -> Filters:
        errors: dict[str, str] = {}
        vm = None
        if raw := (params.get("vm") or "").strip():
            try:
                vm = uuid.UUID(raw)
            except ValueError:
                errors["vm"] = "a VM's id"
        user = (params.get("user") or "").strip()
        if len(user) > 150:
            errors["user"] = "at most 150 characters"
        verb = (params.get("verb") or "").strip()
        if verb and verb not in VERBS:
            errors["verb"] = f"one of {', '.join(VERBS)}"
        state = (params.get("state") or "").strip()
        if state and state not in STATES:
            errors["state"] = f"one of {', '.join(STATES)}"
        before = None
        if raw := (params.get("before") or "").strip():
            try:
                before = int(raw)
                if before < 1:
                    raise ValueError
            except ValueError:
                errors["before"] = "a positive position"
        if errors:
            raise ValidationError(errors)
        return cls(vm=vm, user=user, verb=verb, state=state, before=before)

    def as_dict(self) -> dict[str, Any]:
        """What a trail read records of them."""
        return {
            "vm": str(self.vm) if self.vm else "",
            "user": self.user,
            "verb": self.verb,
            "state": self.state,
            "before": self.before,
        }

    def apply(self, qs: QuerySet[Task]) -> QuerySet[Task]:
        if self.vm:
            qs = qs.filter(vm_id=self.vm)
        if self.user:
            qs = qs.filter(actor=self.user)
        if self.verb:
            qs = qs.filter(verb=self.verb)
        if self.state:
            qs = qs.filter(state=self.state)
        if self.before:
            qs = qs.filter(position__lt=self.before)
        return qs


def page(
    caller: Caller, filters: Filters, size: int = PAGE_SIZE
) -> tuple[list[dict[str, Any]], int | None]:
    """One page of tasks, newest first, and the ``before`` of the next page (None at the end).
    Keyset pagination on the request's position: as fast on the thousandth page as the first."""
    qs = filters.apply(visible_tasks(caller)).order_by("-position")
    rows = list(qs.values(*TASK_COLUMNS)[: size + 1])
    more = len(rows) > size
    rows = rows[:size]
    return [task_representation(r) for r in rows], (rows[-1]["position"] if more else None)


def task_representation(row: dict[str, Any]) -> dict[str, Any]:
    """A task as the API, the page and the live pushes give it (one shape for all three)."""
    requested, finished = row["requested_at"], row["finished_at"]
    return {
        "id": row["request_event_id"],
        "position": row["position"],
        "version": row["version"],
        "vm": {
            "id": str(row["vm_id"]),
            "name": row["vm__name"],
            "owner": row["vm__owner__username"],
        },
        "owner_id": row["vm__owner_id"],
        "verb": row["verb"],
        "kind": row["kind"],
        "actor": row["actor"],
        "actor_type": row["actor_type"],
        "actor_id": row["actor_id"],
        "channel": row["channel"],
        "state": row["state"],
        "step": row["step"],
        "pct": row["pct"],
        "message": row["message"],
        "outcome": row["outcome_type"] or None,
        "error": row["error"],
        "requested_at": requested.isoformat(timespec="milliseconds"),
        "finished_at": finished.isoformat(timespec="milliseconds") if finished else None,
        "duration_s": round((finished - requested).total_seconds(), 3) if finished else None,
        "status_url": f"/api/v1/requests/{row['request_event_id']}/",
    }


def tasks_by_request(request_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The tasks of these requests (the live follower's read), by request id."""
    rows = Task.objects.filter(request_event_id__in=request_ids).values(*TASK_COLUMNS)
    return {r["request_event_id"]: task_representation(r) for r in rows}
