"""Live updates follow the log: a follower tails the event store and pushes new events to the
channel groups that care.

One ``LogFollower`` per web process (started lazily by the first live consumer) reads every event
after its own position with ``audit.store.iter_events`` in a thread of its own, so the event loop
never waits on the database. On PostgreSQL it sleeps on ``LISTEN audit_events`` (the insert trigger
NOTIFYs after each append) with a short timeout as a safety net; on SQLite it polls every
``POLL_S``. Because positions are gap-free and in commit order, "everything after P" never skips a
late commit, and only committed events are ever pushed: workers need no line to the browser.

Groups: ``vm.<id>`` gets the events of that VM and of its snapshots (the detail page's timeline);
``vms`` gets, for each VM event, the VM's current row (the list page). Messages carry the event's
position, and consumers drop positions they have already sent: with a Redis channel layer every web
process's follower pushes each event once, and the copies are dropped there. A VM in a message is
``vms.representation.vm_representation``: the fields and values of the API's.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import threading
import uuid
from collections.abc import Iterable
from typing import Any

import psycopg
from channels.layers import get_channel_layer
from django.db import close_old_connections, connection

from audit import store
from audit.db import NOTIFY_CHANNEL
from audit.models import Event
from vms import tasklog
from vms.models import Snapshot, VirtualMachine
from vms.projectors import TASK_OUTCOMES, TASK_REQUESTS
from vms.representation import VM_COLUMNS, vm_representation

log = logging.getLogger("sandbox.vms.live")

POLL_S = 0.25  # SQLite: the delay between an append and its push, at most
LISTEN_TIMEOUT_S = 0.5  # PostgreSQL: wake up this often even without a NOTIFY (and to stop)
SEND_TIMEOUT_S = 5.0
LIST_GROUP = "vms"
TASK_GROUP = "tasks"  # the task log's pages and panels: a task as each event changes it
# Every open socket listens here: a change of who may do what (a token revoked, a user demoted,
# deactivated or given a new password) makes each re-check its caller (``vms.consumers``).
ACCESS_GROUP = "access"
ACCESS_CHANGES = frozenset(
    {
        "token.revoked",
        "user.role_changed",
        "user.deactivated",
        "user.password_changed",
    }
)


def vm_group(vm_id: object) -> str:
    return f"vm.{vm_id}"


# How a stop or reboot ended (vms.worker's "how"), in words for the timeline: a forced one says
# so, since a killed guest may have lost what it had not written.
_STOP_NOTES = {
    "acpi": "clean power-off (power button)",
    "agent": "clean power-off (guest agent)",
    "forced": "forced stop: killed at once, the guest was not asked",
    "timeout": "forced stop: the guest did not power off in time and was killed",
    "not_running": "stopped: the VM's VMM was not running",
}
_REBOOT_NOTES = {
    "agent": "clean reboot (guest agent)",
    "reset": "forced reboot: reset by the VMM, the guest was not shut down",
}


def event_note(type_: str, data: dict[str, Any]) -> str | None:
    """Words for an outcome whose data alone would not say what happened to the guest."""
    if type_ == "vm.stopped":
        how = data.get("how")
        if isinstance(how, str) and how in _STOP_NOTES:
            return _STOP_NOTES[how]
        return "clean power-off" if data.get("graceful") else "forced stop: the guest was killed"
    if type_ == "vm.rebooted":
        how = data.get("how")
        if isinstance(how, str) and how in _REBOOT_NOTES:
            return _REBOOT_NOTES[how]
        return "clean reboot" if data.get("graceful") else _REBOOT_NOTES["reset"]
    return None


def event_summary(e: store.RecordedEvent) -> dict[str, Any]:
    return {
        "note": event_note(e.type, e.data),
        "position": e.position,
        "event_id": e.event_id,
        "type": e.type,
        "aggregate_type": e.aggregate_type,
        "aggregate_id": e.aggregate_id,
        "recorded_at": e.recorded_at.isoformat(timespec="seconds"),
        "actor": e.actor_name,
        "channel": e.channel,
        "data": e.data,
    }


def messages_for(events: list[store.RecordedEvent]) -> list[tuple[str, dict[str, Any]]]:
    """(group, channel-layer message) for each event of interest, in position order.

    Runs in the follower's thread: it reads the read models, which the inline projection updated
    in the event's own transaction, so they are at least as new as the event.
    """
    vm_ids = {e.aggregate_id for e in events if e.aggregate_type == "vm"}
    snap_ids = {e.aggregate_id for e in events if e.aggregate_type == "snapshot"}
    snap_vm = {
        str(pk): str(vm_id)
        for pk, vm_id in Snapshot.objects.filter(pk__in=uuids_of(snap_ids)).values_list(
            "pk", "vm_id"
        )
        if vm_id
    }
    vm_ids |= set(snap_vm.values())
    vms = {
        str(row["id"]): vm_representation(row)
        for row in VirtualMachine.objects.filter(pk__in=uuids_of(vm_ids)).values(*VM_COLUMNS)
    }
    out: list[tuple[str, dict[str, Any]]] = []
    for e in events:
        if e.type in ACCESS_CHANGES:
            out.append((ACCESS_GROUP, {"type": "access.changed", "position": e.position}))
            continue
        vm_id = e.aggregate_id if e.aggregate_type == "vm" else snap_vm.get(e.aggregate_id)
        if vm_id is None:
            continue
        message = {
            "type": "vm.event",  # handled by the consumers' vm_event()
            "position": e.position,
            "event": event_summary(e),
            "vm": vms.get(vm_id),
        }
        out.append((vm_group(vm_id), message))
        if e.aggregate_type == "vm" and vm_id in vms:
            out.append((LIST_GROUP, message))
    return out + _task_messages(events)


def _task_messages(events: list[store.RecordedEvent]) -> list[tuple[str, dict[str, Any]]]:
    """Each task these events changed, once, as it is now (the task log's live rows)."""
    changed: dict[str, int] = {}  # request id -> position of the last event that changed it
    for e in events:
        if e.type in TASK_REQUESTS:
            changed[e.event_id] = e.position
        elif e.type in TASK_OUTCOMES and e.causation_id:
            changed[e.causation_id] = e.position
        elif e.type == "vm.progress" and isinstance(request := e.data.get("request"), str):
            changed[request] = e.position
    if not changed:
        return []
    tasks = tasklog.tasks_by_request(list(changed))
    return [
        (TASK_GROUP, {"type": "task.event", "position": changed[rid], "task": tasks[rid]})
        for rid in sorted(changed, key=changed.__getitem__)
        if rid in tasks
    ]


def uuids_of(values: Iterable[str]) -> list[uuid.UUID]:
    """The values that are UUIDs, as UUIDs (the others left out)."""
    out = []
    for v in values:
        with contextlib.suppress(ValueError):
            out.append(uuid.UUID(v))
    return out


class LogFollower:
    """Tails the event store from its own position and sends to the channel layer on ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, layer: Any) -> None:
        self.loop = loop
        self.layer = layer
        self.position: int | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-follower", daemon=True)
        self._listen: Any = None  # psycopg connection with LISTEN, on PostgreSQL

    def start(self) -> None:
        self._thread.start()

    async def wait_ready(self, timeout: float = 10.0) -> None:
        await asyncio.to_thread(self._ready.wait, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._follow()
                except Exception:
                    log.exception("log follower failed; restarting in 1s")
                    self._close_db()
                    self._stop.wait(1.0)
        finally:
            self._close_db()
            self._ready.set()

    def _follow(self) -> None:
        if connection.vendor == "postgresql" and self._listen is None:
            self._listen = _listen_connection()
        if self.position is None:
            self.position = store.head()[0]  # push what happens from now on
        self._ready.set()
        while not self._stop.is_set():
            close_old_connections()
            for batch in store.iter_events(after=self.position, batch=500):
                for group, message in messages_for(batch):
                    self._send(group, message)
                self.position = batch[-1].position
            self._wait()

    def _wait(self) -> None:
        if self._listen is not None:
            # Any NOTIFY wakes us; several appends during one read collapse into one wake-up.
            for _ in self._listen.notifies(timeout=LISTEN_TIMEOUT_S, stop_after=1):
                pass
        else:
            self._stop.wait(POLL_S)

    def _send(self, group: str, message: dict[str, Any]) -> None:
        if self.loop.is_closed():
            self._stop.set()
            return
        # Wait for each send: keeps the order per group and pushes back on a slow layer.
        future = asyncio.run_coroutine_threadsafe(self.layer.group_send(group, message), self.loop)
        try:
            future.result(SEND_TIMEOUT_S)
        except Exception as exc:  # a full or unreachable layer must not stop the follower
            future.cancel()
            log.warning("live update to %s dropped: %s", group, exc)

    def _close_db(self) -> None:
        if self._listen is not None:
            with contextlib.suppress(Exception):
                self._listen.close()
            self._listen = None
        with contextlib.suppress(Exception):
            connection.close()  # this thread's Django connection


def _listen_connection() -> Any:
    """A psycopg connection of its own (autocommit) that LISTENs on ``audit_events``."""
    s = connection.settings_dict
    conn = psycopg.connect(
        dbname=s["NAME"],
        user=s.get("USER") or None,
        password=s.get("PASSWORD") or None,
        host=s.get("HOST") or None,
        port=s.get("PORT") or None,
        autocommit=True,
        application_name="sandbox-log-follower",
    )
    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
    return conn


_follower: LogFollower | None = None
_lock = threading.Lock()


async def ensure_follower() -> LogFollower:
    """The process's follower, started on first use (and again if its event loop is gone)."""
    global _follower
    loop = asyncio.get_running_loop()
    old = None
    with _lock:  # never held across an await
        if _follower is None or not _follower.alive or _follower.loop is not loop:
            old = _follower
            _follower = LogFollower(loop, get_channel_layer())
            _follower.start()
        follower = _follower
    if old is not None:
        await asyncio.to_thread(old.stop)
    await follower.wait_ready()
    return follower


def stop_follower() -> None:
    """Stop the follower (tests, shutdown); it joins its thread and closes its connections."""
    global _follower
    with _lock:
        follower, _follower = _follower, None
    if follower is not None:
        follower.stop()


atexit.register(stop_follower)


def vm_timeline(vm: VirtualMachine, *, after: int = 0, limit: int = 200) -> list[dict[str, Any]]:
    """The last ``limit`` events of ``vm`` and its snapshots after ``after``, oldest first
    (the detail page's first render, and a consumer's catch-up after connecting)."""
    snapshot_ids = [str(s) for s in Snapshot.objects.filter(vm=vm).values_list("pk", flat=True)]
    qs = (
        Event.objects.filter(aggregate_type="vm", aggregate_id=str(vm.pk))
        | Event.objects.filter(aggregate_type="snapshot", aggregate_id__in=snapshot_ids)
    ).filter(position__gt=after)
    rows = list(qs.order_by("-position").values_list(*store.COLUMNS)[:limit])
    return [event_summary(store.RecordedEvent.from_row(r)) for r in reversed(rows)]
