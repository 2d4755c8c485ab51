"""Snapshot retention, run by the worker: keep the last N per VM, drop those older than a limit."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from accounts.caller import Caller
from audit.actor import Actor
from vms import commands
from vms.models import Snapshot


def apply_retention(*, keep_last: int | None = None, max_age_days: int | None = None) -> int:
    keep = settings.SANDBOX_SNAPSHOT_KEEP_LAST if keep_last is None else keep_last
    age = settings.SANDBOX_SNAPSHOT_MAX_AGE_DAYS if max_age_days is None else max_age_days
    ready = Snapshot.objects.filter(state__in=[Snapshot.State.READY, Snapshot.State.CORRUPTED])
    doomed: dict[object, str] = {}
    if age:
        for snap in ready.filter(created_at__lt=timezone.now() - timedelta(days=age)):
            doomed[snap.pk] = f"retention: older than {age} days"
    if keep:
        by_vm: dict[object, list[Snapshot]] = {}
        for snap in ready.exclude(vm=None).order_by("-created_at"):
            by_vm.setdefault(snap.vm_id, []).append(snap)
        for snaps in by_vm.values():
            for snap in snaps[keep:]:
                doomed.setdefault(snap.pk, f"retention: beyond the last {keep} of its VM")
    for snap in Snapshot.objects.filter(pk__in=list(doomed)).select_related("owner"):
        caller = Caller(user=snap.owner, actor=Actor.system(channel="worker", name="retention"))
        commands.delete_snapshot(caller, snap, reason=doomed[snap.pk], enforce_permissions=False)
    return len(doomed)
