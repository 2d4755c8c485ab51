"""Websocket consumers of the dashboard: the live VM list, a VM's live page, the serial console.

Every consumer checks login and visibility on connect (another operator's VM is refused exactly
like a missing one), never blocks the event loop (database work goes through
``database_sync_to_async``, files and samplers through threads), and cancels and awaits every
task it started when the socket closes.

Close codes before accept: 4401 not logged in, 4403 not visible / not allowed, 4503 the event
store could not record the console session (fail closed: no unrecorded session).

An open socket re-checks its caller (``accounts.authentication.recheck_socket``) whenever access
changes (a token revoked, a user demoted, deactivated or given a new password: the log follower
tells every socket), every ``RECHECK_S`` seconds (a token that expires makes no event), and
before console input (at most once a ``RECHECK_INPUT_S``): it closes with 4401 when the caller
is gone and 4403 when the caller may no longer see or do what the socket does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import uuid
from typing import Any
from urllib.parse import parse_qsl

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from accounts.authentication import recheck_socket, socket_refused
from accounts.caller import Caller
from accounts.models import APIToken
from accounts.scopes import VM_READ, check_socket
from audit.commands import read_details, record_trail_read
from core import parsers
from vms import console, idle, lifecycle, live, metrics_live, policy
from vms.models import VirtualMachine
from vms.representation import represent_vm

log = logging.getLogger("sandbox.vms.consumers")

OUTBOX_MAX = 2048  # queued frames per websocket before a too-slow client is dropped
CLOSE_UNAUTHENTICATED, CLOSE_FORBIDDEN, CLOSE_UNRECORDED, CLOSE_TOO_SLOW = 4401, 4403, 4503, 4008
CLOSE_RECHECK_FAILED = 1011  # the caller could not be re-checked (database unavailable)
RECHECK_S = 30.0  # an open socket re-checks its caller at least this often
RECHECK_INPUT_S = 1.0  # console input re-checks the caller when the last check is older


def _int(value: str | None, default: int, lo: int, hi: int) -> int:
    try:
        return max(lo, min(hi, int(value or default)))
    except ValueError:
        return default


def _query(scope: dict[str, Any]) -> dict[str, str]:
    return dict(parse_qsl(scope.get("query_string", b"").decode()))


class _Outbox:
    """A bounded queue of frames and the task that sends them, so that a producer (the serial
    reader, the follower) never waits for one slow browser."""

    def __init__(self, consumer: AsyncWebsocketConsumer) -> None:
        self.consumer = consumer
        self.queue: asyncio.Queue[tuple[str | None, bytes | None]] = asyncio.Queue(OUTBOX_MAX)
        self.task = asyncio.create_task(self._pump())
        self.overflowed = False

    def put(self, text: str | None = None, data: bytes | None = None) -> None:
        try:
            self.queue.put_nowait((text, data))
        except asyncio.QueueFull:
            if not self.overflowed:
                self.overflowed = True
                self.task.cancel()
                asyncio.create_task(self.consumer.close(code=CLOSE_TOO_SLOW))  # noqa: RUF006

    async def _pump(self) -> None:
        while True:
            text, data = await self.queue.get()
            await self.consumer.send(text_data=text, bytes_data=data)

    async def aclose(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task


class _Rechecked(AsyncWebsocketConsumer):
    """A socket that keeps checking that its caller may still have it (module docstring).

    ``watch()`` after accept; ``unwatch()`` on disconnect; a subclass says in ``allowed()``
    whether the (fresh) caller may still have this socket, and may re-apply what it sees."""

    watcher: asyncio.Task[None] | None = None
    checked_at = 0.0  # when the last check found the caller still allowed
    ended = False
    _checking: asyncio.Lock | None = None

    @property
    def checking(self) -> asyncio.Lock:
        """Held while a check runs: one at a time, and input waits for the one in flight."""
        if self._checking is None:
            self._checking = asyncio.Lock()
        return self._checking

    async def watch(self) -> None:
        self.checked_at = asyncio.get_running_loop().time()
        await self.channel_layer.group_add(live.ACCESS_GROUP, self.channel_name)
        self.watcher = asyncio.create_task(self._recheck_periodically())
        await live.ensure_follower()  # it tells the access group of changes

    async def unwatch(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watcher
            self.watcher = None
            await self.channel_layer.group_discard(live.ACCESS_GROUP, self.channel_name)

    async def _recheck_periodically(self) -> None:
        while True:
            await asyncio.sleep(RECHECK_S)
            await self.recheck()

    async def access_changed(self, message: dict[str, Any]) -> None:
        await self.recheck()

    async def recheck(self) -> bool:
        """Whether the caller may still have this socket; if not, the socket is closed."""
        async with self.checking:
            if self.ended:
                return False
            try:
                code = await database_sync_to_async(recheck_socket)(self.scope)
                if code is None and not await self.allowed():
                    code = CLOSE_FORBIDDEN
            except Exception:
                # Who the caller is cannot be read now: fail closed (the browser reconnects).
                log.exception("websocket caller not re-checked: closing")
                code = CLOSE_RECHECK_FAILED
            if code is None:
                # Only a check that passed counts as recent (input skips its own after it).
                self.checked_at = asyncio.get_running_loop().time()
                return True
            self.ended = True
            await self.close(code=code)
            return False

    async def allowed(self) -> bool:
        raise NotImplementedError


def _caller(scope: dict[str, Any]) -> Caller:
    """The socket's user, through its API token if the handshake carried one: which VMs it
    reaches follows the token's scopes too (``vms.policy.sees_all_vms``)."""
    token = scope.get("auth")
    return Caller(user=scope["user"], token=token if isinstance(token, APIToken) else None)


@database_sync_to_async
def _visible_vm(caller: Caller, vm_id: str) -> dict[str, Any] | None:
    if not caller.user.is_active:
        return None
    vm = policy.visible_vms(caller).filter(pk=vm_id).first()
    return represent_vm(vm) if vm else None


class VMListConsumer(_Rechecked):
    """``ws/vms/live/``: the VMs the user may see, as they change (the list page), and the
    metrics of the live ones the page asks for (``receive``)."""

    outbox: _Outbox | None = None
    flusher: asyncio.Task[None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hubs: dict[str, tuple[metrics_live.MetricsHub, Any]] = {}  # the watched VMs
        self.samples: dict[str, dict[str, Any]] = {}  # their latest, since the last flush

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        if await socket_refused(self.scope, VM_READ, write=False):
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.user_id = user.pk
        self.caller = _caller(self.scope)
        self.sees_all = await database_sync_to_async(policy.sees_all_vms)(self.caller)
        self.sent: dict[str, int] = {}  # vm id -> last version sent
        await self.accept()
        self.outbox = _Outbox(self)
        await self.channel_layer.group_add(live.LIST_GROUP, self.channel_name)
        await live.ensure_follower()
        # After joining: a change between the page's render and now is in this snapshot.
        for vm in await self._snapshot():
            self._push(vm)
        await self.watch()

    async def allowed(self) -> bool:
        # A caller who no longer sees every VM (demoted, or a narrower token) closes: what it
        # was sent of others' VMs is on its screen, and nothing more of them may follow.
        self.caller = _caller(self.scope)
        sees_all = await database_sync_to_async(policy.sees_all_vms)(self.caller)
        if self.sees_all and not sees_all:
            return False
        self.sees_all = sees_all
        return True

    @database_sync_to_async
    def _snapshot(self) -> list[dict[str, Any]]:
        qs = policy.visible_vms(self.caller).exclude(state=lifecycle.GONE)
        return [represent_vm(vm) for vm in qs]

    def _push(self, vm: dict[str, Any]) -> None:
        if not policy.may_see(self.caller, vm["owner_id"], sees_all=self.sees_all):
            return
        if self.sent.get(vm["id"], -1) >= vm["version"]:
            return  # a duplicate (another process's follower) or older than what was sent
        self.sent[vm["id"]] = vm["version"]
        assert self.outbox is not None
        self.outbox.put(text=json.dumps({"type": "vm", "vm": vm}))

    async def vm_event(self, message: dict[str, Any]) -> None:
        if message.get("vm") and not self.ended:
            self._push(message["vm"])

    # --- The list's live columns: CPU, memory used, uptime of the VMs the page shows ---------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """``{"type": "watch", "vms": [id, ...]}``: the live VMs on the page, whose metrics it
        shows (at most ``WATCH_MAX``; the ones the caller may not see are left out)."""
        try:
            message = parsers.loads(text_data or "")
        except ValueError:
            message = None
        ids = message.get("vms") if isinstance(message, dict) else None
        if (
            not isinstance(message, dict)
            or message.get("type") != "watch"
            or not isinstance(ids, list)
            or len(ids) > WATCH_MAX
            or not all(isinstance(i, str) for i in ids)
        ):
            self._send(
                {
                    "type": "error",
                    "detail": f"send {{'type': 'watch', 'vms': [at most {WATCH_MAX} VM ids]}}",
                }
            )
            return
        wanted = set(await self._watchable(live.uuids_of(ids)))
        for vm_id in [v for v in self.hubs if v not in wanted]:
            hub, push = self.hubs.pop(vm_id)
            self.samples.pop(vm_id, None)
            await metrics_live.unsubscribe(hub, push)
        for vm_id in wanted - set(self.hubs):
            push = functools.partial(self._metrics, vm_id)
            self.hubs[vm_id] = (await metrics_live.subscribe(vm_id, push), push)
        if self.hubs and (self.flusher is None or self.flusher.done()):
            self.flusher = asyncio.create_task(self._flush_metrics())

    @database_sync_to_async
    def _watchable(self, ids: list[uuid.UUID]) -> list[str]:
        qs = policy.visible_vms(self.caller).filter(pk__in=ids, state__in=metrics_live.LIVE_STATES)
        return [str(pk) for pk in qs.values_list("pk", flat=True)]

    def _metrics(self, vm_id: str, message: dict[str, Any]) -> None:
        self.samples[vm_id] = list_metrics(message["sample"])

    async def _flush_metrics(self) -> None:
        """The samples that came since the last flush, as one message every ``LIST_METRICS_S``
        (a page of 50 VMs gets one frame, not 50 a second)."""
        while self.hubs and not self.ended:
            await asyncio.sleep(LIST_METRICS_S)
            if self.samples:
                batch, self.samples = self.samples, {}
                self._send({"type": "metrics", "samples": batch})

    def _send(self, message: dict[str, Any]) -> None:
        if self.outbox is not None:
            self.outbox.put(text=json.dumps(message))

    async def disconnect(self, code: int) -> None:
        self.ended = True
        await self.unwatch()
        if self.flusher is not None:
            self.flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.flusher
        for hub, push in self.hubs.values():
            await metrics_live.unsubscribe(hub, push)
        self.hubs.clear()
        if self.outbox is not None:
            await self.channel_layer.group_discard(live.LIST_GROUP, self.channel_name)
            await self.outbox.aclose()


WATCH_MAX = 100  # a list page shows at most 50 (vms.views.LIST_PAGE)
LIST_METRICS_S = 2.0


def list_metrics(sample: dict[str, Any]) -> dict[str, Any]:
    """The list's columns of a sample: CPU % of one core, memory the guest uses (its agent's
    health: total less available) or else the VMM's resident size, and the guest's uptime."""
    health = sample.get("health") or {}
    memory = health.get("memory_kib") or {}
    total, available = memory.get("total"), memory.get("available")
    used = (
        (total - available) * 1024
        if isinstance(total, int) and isinstance(available, int)
        else None
    )
    return {
        "state": sample.get("state"),
        "cpu_percent": sample.get("cpu_percent"),
        "memory_used_bytes": used,
        "rss_bytes": sample.get("rss_bytes"),
        "uptime_s": health.get("uptime_s"),
    }


class TaskLogConsumer(_Rechecked):
    """``ws/tasks/live/``: each task on a VM the user may see, as each event changes it (the
    task log's page and the home page's panel). The page's render was the trail read; what is
    pushed after it records nothing, as for the VM timeline."""

    outbox: _Outbox | None = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        if await socket_refused(self.scope, VM_READ, write=False):
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.caller = _caller(self.scope)
        self.sees_all = await database_sync_to_async(policy.sees_all_vms)(self.caller)
        self.sent: dict[str, int] = {}  # task id -> last version sent
        await self.accept()
        self.outbox = _Outbox(self)
        await self.channel_layer.group_add(live.TASK_GROUP, self.channel_name)
        await live.ensure_follower()
        await self.watch()

    async def allowed(self) -> bool:
        self.caller = _caller(self.scope)
        sees_all = await database_sync_to_async(policy.sees_all_vms)(self.caller)
        if self.sees_all and not sees_all:
            return False
        self.sees_all = sees_all
        return True

    async def task_event(self, message: dict[str, Any]) -> None:
        task = message.get("task")
        if not task or self.ended or self.outbox is None:
            return
        if not policy.may_see(self.caller, task["owner_id"], sees_all=self.sees_all):
            return
        if self.sent.get(task["id"], -1) >= task["version"]:
            return  # a duplicate (another process's follower) or older than what was sent
        self.sent[task["id"]] = task["version"]
        self.outbox.put(text=json.dumps({"type": "task", "task": task}))

    async def disconnect(self, code: int) -> None:
        self.ended = True
        await self.unwatch()
        if self.outbox is not None:
            await self.channel_layer.group_discard(live.TASK_GROUP, self.channel_name)
            await self.outbox.aclose()


class VMLiveConsumer(_Rechecked):
    """``ws/vms/<id>/live/?after=<position>``: one VM's state, timeline and metrics."""

    outbox: _Outbox | None = None
    metrics: metrics_live.MetricsHub | None = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        if await socket_refused(self.scope, VM_READ, write=False):
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.vm_id = str(self.scope["url_route"]["kwargs"]["vm_id"])
        vm = await _visible_vm(_caller(self.scope), self.vm_id)
        if vm is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.group = live.vm_group(self.vm_id)
        self.last_position = _int(_query(self.scope).get("after"), 0, 0, 1 << 62)
        await self.accept()
        self.outbox = _Outbox(self)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await live.ensure_follower()
        # Catch up on what happened between the page's render and the join.
        for event in await self._catch_up():
            self._event(event, None)
        fresh = await _visible_vm(_caller(self.scope), self.vm_id)
        self.outbox.put(text=json.dumps({"type": "vm", "vm": fresh or vm}))
        if (fresh or vm)["state"] != lifecycle.GONE:
            self.metrics = await metrics_live.subscribe(self.vm_id, self._metrics)
        await self.watch()

    async def allowed(self) -> bool:
        return await _visible_vm(_caller(self.scope), self.vm_id) is not None

    @database_sync_to_async
    def _catch_up(self) -> list[dict[str, Any]]:
        """The events since ``after``, recorded as one trail read for the connection (the
        events pushed afterwards are part of this read: no event per push). A read the log
        cannot record is not served: the error ends the connection."""
        vm = VirtualMachine.objects.filter(pk=self.vm_id).first()
        events = live.vm_timeline(vm, after=self.last_position) if vm else []
        record_trail_read(
            console.session_actor(self.scope["user"], self.scope),
            "live.vm_timeline",
            read_details({"vm": self.vm_id, "after": self.last_position}, events),
        )
        return events

    def _event(self, event: dict[str, Any], vm: dict[str, Any] | None) -> None:
        if event["position"] <= self.last_position:
            return  # already sent (catch-up) or a copy from another process's follower
        self.last_position = event["position"]
        assert self.outbox is not None
        self.outbox.put(text=json.dumps({"type": "event", "event": event, "vm": vm}))

    def _metrics(self, message: dict[str, Any]) -> None:
        if self.outbox is not None:
            self.outbox.put(text=json.dumps(message))

    async def vm_event(self, message: dict[str, Any]) -> None:
        if not self.ended:
            self._event(message["event"], message.get("vm"))

    async def disconnect(self, code: int) -> None:
        self.ended = True
        await self.unwatch()
        if self.metrics is not None:
            await metrics_live.unsubscribe(self.metrics, self._metrics)
            self.metrics = None
        if self.outbox is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)
            await self.outbox.aclose()


class ConsoleConsumer(_Rechecked):
    """``ws/vms/<id>/console/?cols=&rows=``: the VM's serial console.

    Binary frames both ways are terminal bytes; text frames are JSON status (server to browser).
    Input from a read-only session (viewers, auditors) is counted and dropped here: it never
    reaches the hub, let alone the guest.
    """

    # The guest's output comes from the console relay (the only reader of the VM's serial
    # socket, maybe in another process) through the channel layer; keystrokes go back that way.
    attached = False
    keeper: asyncio.Task[None] | None = None
    outbox: _Outbox | None = None
    recording: console.Recording | None = None
    touched_at = float("-inf")  # the loop time console input last marked the VM used

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # Whatever ends the consumer (a clean close, or an error), the session ends recorded.
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._end_session()

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        vm_id = str(self.scope["url_route"]["kwargs"]["vm_id"])
        if await socket_refused(self.scope, VM_READ, write=False):
            await self.close(code=CLOSE_FORBIDDEN)
            return
        access = await database_sync_to_async(console.access_for)(
            user, vm_id, self.scope.get("auth")
        )
        if access is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        if access.mode == "write" and check_socket(
            self.scope, policy.scope_of("console"), write=True
        ):
            # Typing is a write: a read-only token, or one without the console scope, watches.
            access = dataclasses.replace(access, mode="read")
        self.access = access
        self.ignored_input = 0
        query = _query(self.scope)
        cols, rows = _int(query.get("cols"), 80, 10, 500), _int(query.get("rows"), 24, 5, 200)
        self.session = uuid.uuid4().hex[:16]
        self.actor = console.session_actor(user, self.scope)
        path, self.recording_ref = console.new_recording_path(access.vm_id, self.session)
        try:
            opened = await database_sync_to_async(console.record_opened)(
                self.actor,
                access.vm_id,
                session=self.session,
                mode=access.mode,
                recording=self.recording_ref,
                cols=cols,
                rows=rows,
            )
        except Exception:
            log.exception("console session of %s not recorded: refused", access.vm_id)
            await self.close(code=CLOSE_UNRECORDED)
            return
        self.opened_event_id = opened.event_id
        self.recording = console.Recording(
            path,
            cols=cols,
            rows=rows,
            title=f"{access.vm_name} ({user.username}, {access.mode})",
            record_input=access.mode == "write",
            masker=await database_sync_to_async(console.masker_for_vm)(access.vm_id),
        )
        await self.accept()
        self.outbox = _Outbox(self)
        self.outbox.put(
            text=json.dumps(
                {
                    "type": "session",
                    "session": self.session,
                    "mode": access.mode,
                    "vm": access.vm_name,
                    "state": access.state,
                }
            )
        )
        self.flusher = asyncio.create_task(self._flush_periodically())
        await console.ensure_relay()
        self.relay = console.relay_channel()
        self.keeper = asyncio.create_task(self._keep_attached())
        await self.watch()

    async def allowed(self) -> bool:
        """The session goes on only as it began: the same access, in the same mode."""
        access = await database_sync_to_async(console.access_for)(
            self.scope["user"], self.access.vm_id, self.scope.get("auth")
        )
        return access is not None and (self.access.mode == "read" or access.mode == "write")

    async def _keep_attached(self) -> None:
        """Attach to the relay, and say so again every few seconds: the relay drops consumers
        it stops hearing from, and a restarted relay learns who is attached."""
        announced = False
        waited = 0.0
        while True:
            await self.channel_layer.send(
                self.relay,
                {"type": "console.attach", "vm": self.access.vm_id, "reply": self.channel_name},
            )
            interval = console.RELAY_TIMEOUT_S if not self.attached else console.KEEPALIVE_S
            await asyncio.sleep(interval)
            waited = 0.0 if self.attached else waited + interval
            if waited and not announced:
                announced = True
                self.notify(
                    {
                        "type": "link",
                        "connected": False,
                        "reason": "the console relay does not answer (is the worker running?)",
                    }
                )

    # Messages from the relay.
    async def console_attached(self, message: dict[str, Any]) -> None:
        if self.attached:
            return  # a restarted relay's scrollback: already on screen
        self.attached = True
        if message.get("scrollback"):
            self.deliver(message["scrollback"])

    async def console_output(self, message: dict[str, Any]) -> None:
        if self.attached:
            self.deliver(message["data"])

    async def console_link(self, message: dict[str, Any]) -> None:
        self.notify(message["status"])

    def deliver(self, chunk: bytes) -> None:
        if self.outbox is not None and self.recording is not None:
            self.recording.output(chunk)
            self.outbox.put(data=chunk)

    def notify(self, status: dict[str, Any]) -> None:
        if self.outbox is not None:
            self.outbox.put(text=json.dumps(status))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        data = bytes_data
        if text_data is not None:
            try:
                message = parsers.loads(text_data)  # ValueError also when nested too deep
            except ValueError:
                message = None
            if not isinstance(message, dict):  # "[1,2]" or "5" is JSON, but not a message
                self.notify({"type": "error", "detail": "send one JSON object (or raw bytes)"})
                return
            if message.get("type") != "input" or not isinstance(message.get("data"), str):
                return  # resize and pings: a serial line has no window size
            data = message["data"].encode()
        if not data or self.recording is None:
            return
        if self.access.mode != "write":
            self.ignored_input += len(data)
            return
        now = asyncio.get_running_loop().time()
        # A check in flight may yet close the socket: the input waits for it (and checks again).
        stale = self.checking.locked() or now - self.checked_at >= RECHECK_INPUT_S
        if (self.ended or stale) and not await self.recheck():
            self.ignored_input += len(data)
            return  # the caller may no longer type here: the socket is closing
        if not self.attached:
            self.notify({"type": "link", "connected": False, "reason": "input not delivered"})
            return
        self.recording.input(data)
        if now - self.touched_at >= idle.TOUCH_EVERY_S:
            # Console input is use of the VM (its idle policy, vms.idle), noted now and then.
            self.touched_at = now
            await database_sync_to_async(idle.touch)(self.access.vm_id)
        await self.channel_layer.send(
            self.relay,
            {
                "type": "console.input",
                "vm": self.access.vm_id,
                "reply": self.channel_name,
                "data": data,
            },
        )

    async def _flush_periodically(self) -> None:
        assert self.recording is not None
        while True:
            await asyncio.sleep(console.FLUSH_INTERVAL_S)
            await self.recording.flush()

    async def disconnect(self, code: int) -> None:
        await self._end_session()

    async def _end_session(self) -> None:
        """Detach from the relay, stop the tasks, close the recording and append the closing
        event; idempotent (called on disconnect and again when the consumer ends)."""
        self.ended = True
        await self.unwatch()
        if self.keeper is not None:
            self.keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.keeper
            self.keeper = None
            with contextlib.suppress(Exception):  # the relay drops a silent consumer anyway
                await self.channel_layer.send(
                    self.relay,
                    {"type": "console.detach", "vm": self.access.vm_id, "reply": self.channel_name},
                )
        if self.outbox is not None:
            await self.outbox.aclose()
            self.outbox = None
        flusher = getattr(self, "flusher", None)
        if flusher is not None:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        if self.recording is None:
            return
        recording, self.recording = self.recording, None
        await recording.flush(final=True)
        try:
            await database_sync_to_async(console.record_closed)(
                self.actor,
                self.access.vm_id,
                session=self.session,
                opened_event_id=self.opened_event_id,
                recording=self.recording_ref,
                size=recording.size,
                sha256=recording.sha256,
                duration_s=recording.duration_s,
                input_bytes=recording.input_bytes,
                output_bytes=recording.output_bytes,
                ignored_input_bytes=self.ignored_input,
            )
        except Exception:
            log.exception("console session %s: closing event not recorded", self.session)
