"""The in-browser serial console: one reader per VM for all web processes, fan-out through the
channel layer, scrollback, recording, and the events that reference each session.

QEMU's serial chardev socket accepts a single client, and several browsers, served by several
web processes, may watch one VM. So exactly one process connects to a VM's serial socket: the
console ``Relay`` (in the worker's main process when web processes are joined by Redis, in the
web process on the embedded default). Its ``ConsoleHub`` per VM reads the guest's output once and
sends every chunk through the channel layer to every attached websocket, whichever process
serves it, keeping the last ``SCROLLBACK_BYTES`` in a ring so a late joiner first sees what was
on the screen. The ring is seeded from the tail of ``console.log`` (which QEMU keeps while nobody
is attached). Keystrokes come back through the channel layer to the relay. When the last
websocket leaves, the serial connection is closed, freeing the socket for other tools.

Every session is recorded once, by the web process that serves its websocket, as asciicast v2
(output with timestamps; input too for operators) under the console directory and referenced by
``vm.console_opened`` / ``vm.console_closed`` (path, size, SHA-256), appended through the command
functions at the bottom of this module, so an auditor can replay it. File writes happen off the
event loop.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from channels.db import database_sync_to_async
from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer
from django.conf import settings

from accounts import roles
from accounts.caller import Caller
from accounts.models import APIToken, User
from audit import store
from audit.actor import Actor
from secretstore import guests
from secretstore.masking import NO_MASKER, Masker
from vms import commands, lifecycle, policy, runtime
from vms.hypervisors.base import HypervisorError, RuntimeDir
from vms.hypervisors.process import check_peer
from vms.models import VirtualMachine

log = logging.getLogger("sandbox.vms.console")

SCROLLBACK_BYTES = 128 * 1024  # what a late joiner gets replayed
READ_CHUNK = 64 * 1024
RECONNECT_S = 1.0  # retry interval while the VMM's socket is absent (VM stopped, rebooting)
FLUSH_INTERVAL_S = 0.5  # recordings are written in batches, off the event loop

Mode = Literal["write", "read"]


def console_dir() -> Path:
    """Where recordings live (``SANDBOX_CONSOLE_DIR``, else ``DATA_DIR/console``)."""
    configured = getattr(settings, "SANDBOX_CONSOLE_DIR", None)
    return Path(configured) if configured else Path(settings.DATA_DIR) / "console"


# --- Who may do what ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    vm_id: str
    vm_name: str
    mode: Mode
    state: str


def access_for(user: Any, vm_id: uuid.UUID | str, token: Any = None) -> Access | None:
    """The console access of ``user`` (through API ``token``, if any) to VM ``vm_id``: None when
    the VM is not visible to them (another operator's VM looks exactly like a missing one),
    "write" for those who may type (the console verb of ``vms.policy``: vms.console_vm on their
    own VM, or on any VM with vms.manage_all_vms; a scoped token must hold these in its
    scopes), else "read"."""
    if user is None or not user.is_authenticated or not user.is_active:
        return None
    caller = Caller(user=user, token=token if isinstance(token, APIToken) else None)
    vm = policy.visible_vms(caller).filter(pk=vm_id).exclude(state=lifecycle.GONE).first()
    if vm is None:
        return None
    return Access(str(vm.pk), vm.name, policy.console_mode(caller, vm), vm.state)


# --- The reader and its fan-out -----------------------------------------------------------------


class Subscriber(Protocol):
    def deliver(self, chunk: bytes) -> None:
        """Guest output; must not block (queue it)."""

    def notify(self, status: dict[str, Any]) -> None:
        """A status change of the serial link (connected, disconnected)."""


def _tail(path: Path, limit: int) -> bytes:
    """The last ``limit`` bytes of ``path``, starting at a line boundary when cut."""
    try:
        # The VMM owns console.log (a jailed one too): never follow a link it put there.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            data = fh.read(limit)
    except OSError:
        return b""
    if size > limit:
        cut = data.find(b"\n")
        data = data[cut + 1 :] if cut >= 0 else data
    return data


class ConsoleHub:
    """The serial connection to one VM, shared by every attached websocket (run by the relay)."""

    def __init__(self, vm_id: str, socket_path: Path, log_path: Path) -> None:
        self.vm_id = vm_id
        self.socket_path = socket_path
        self.log_path = log_path
        self.subscribers: set[Subscriber] = set()
        self.scrollback = bytearray()
        self.connected = False
        # What the guest prints is masked for the secrets it was given before it is kept or
        # sent (refreshed at each attach: an exec may have given it more since).
        self.masker: Masker = NO_MASKER
        self._mask = self.masker.stream()
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    # Called with the relay's lock held, so attach/detach of one VM never interleave.
    async def _attach(self, sub: Subscriber) -> bytes:
        masker = await database_sync_to_async(masker_for_vm)(self.vm_id)
        if masker.names != self.masker.names:
            self.masker, self._mask = masker, masker.stream()
        if self._task is None:
            # Seed the ring from the log before connecting: at worst a line appears twice,
            # never is a line lost.
            seed = await asyncio.to_thread(_tail, self.log_path, SCROLLBACK_BYTES)
            self.scrollback[:] = self.masker.mask(seed)
            self._task = asyncio.create_task(self._run(), name=f"console-reader-{self.vm_id}")
        # Snapshot and registration with no await in between: the subscriber gets the ring, then
        # exactly the chunks after it.
        self.subscribers.add(sub)
        sub.notify({"type": "link", "connected": self.connected})
        return bytes(self.scrollback)

    async def _detach(self, sub: Subscriber) -> bool:
        """Remove ``sub``; close the link when nobody is left. True when the hub is done."""
        self.subscribers.discard(sub)
        if self.subscribers:
            return False
        await self.close()
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._drop_writer()

    def _drop_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def send_input(self, data: bytes) -> bool:
        """Write keystrokes to the guest; False when the serial link is down."""
        writer = self._writer
        if writer is None or writer.is_closing():
            return False
        writer.write(data)
        # Returns at once under the transport's high-water mark; waits only for a stuck guest.
        await writer.drain()
        return True

    def _broadcast_status(self, status: dict[str, Any]) -> None:
        for sub in list(self.subscribers):
            sub.notify(status)

    async def _run(self) -> None:
        announced_down = False
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
            except OSError as exc:
                if not announced_down:
                    self._broadcast_status(
                        {"type": "link", "connected": False, "reason": f"no serial socket: {exc}"}
                    )
                    announced_down = True
                await asyncio.sleep(RECONNECT_S)
                continue
            try:
                # Only the VMM's own socket: a (jailed) VMM owns this directory's sockets and
                # could link another server's in place of its own.
                pid = RuntimeDir(self.socket_path.parent).pid()
                check_peer(writer.get_extra_info("socket"), pid, "the serial socket")
            except (HypervisorError, OSError) as exc:
                writer.close()
                if not announced_down:
                    self._broadcast_status({"type": "link", "connected": False, "reason": str(exc)})
                    announced_down = True
                await asyncio.sleep(RECONNECT_S)
                continue
            self._writer = writer
            self.connected, announced_down = True, False
            self._broadcast_status({"type": "link", "connected": True})
            try:
                while raw := await reader.read(READ_CHUNK):
                    chunk = self._mask.feed(raw)
                    if not chunk:
                        continue  # held back: it may be the start of a value
                    self.scrollback += chunk
                    if len(self.scrollback) > SCROLLBACK_BYTES:
                        del self.scrollback[: len(self.scrollback) - SCROLLBACK_BYTES]
                    for sub in list(self.subscribers):
                        sub.deliver(chunk)
            except OSError as exc:
                log.info("console %s: serial link lost: %s", self.vm_id, exc)
            finally:
                self.connected = False
                self._drop_writer()
            self._broadcast_status({"type": "link", "connected": False, "reason": "VMM closed"})
            announced_down = True
            await asyncio.sleep(RECONNECT_S)


# --- The relay: one reader per VM for every web process -----------------------------------------


def relay_channel() -> str:
    """The channel-layer channel of this installation's console relay (one per queue, that is
    per hypervisor host: the relay must run where the VMs' serial sockets are)."""
    return f"console-relay.{settings.Q_CLUSTER['name']}"


def relay_placement() -> str:
    """``worker``: the relay runs in the worker's main process (``manage.py worker``), which
    every web process reaches through the Redis channel layer; ``web``: in the web process
    itself (the embedded default: one web process, in-memory channel layer)."""
    return str(getattr(settings, "SANDBOX_CONSOLE_RELAY", "web"))


class _Remote:
    """A console websocket attached to a hub, known by its channel-layer channel name (it may
    live in any web process)."""

    def __init__(self, relay: Relay, vm_id: str, channel: str) -> None:
        self.relay, self.vm_id, self.channel = relay, vm_id, channel
        self.last_seen = time.monotonic()

    def deliver(self, chunk: bytes) -> None:
        self.relay.post(self.channel, {"type": "console.output", "vm": self.vm_id, "data": chunk})

    def notify(self, status: dict[str, Any]) -> None:
        self.relay.post(self.channel, {"type": "console.link", "vm": self.vm_id, "status": status})


class Relay:
    """The only reader of each VM's serial socket, serving console websockets of every web
    process through the channel layer.

    Consumers send to ``relay_channel()``: ``console.attach`` (also every ``KEEPALIVE_S`` while
    the websocket is open; a consumer not heard of for ``SUBSCRIBER_TTL_S`` is dropped, so a
    killed web process does not keep a serial link open), ``console.input`` and
    ``console.detach``, each with the VM id and the consumer's channel as ``reply``. The relay
    answers an attach with ``console.attached`` and the scrollback, then sends every chunk of
    output (``console.output``) and every change of the serial link (``console.link``) to each
    attached consumer. All sends go out in order from one task, so a consumer gets its
    scrollback, then exactly the chunks after it.
    """

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.hubs: dict[str, ConsoleHub] = {}
        self.subs: dict[tuple[str, str], _Remote] = {}
        self._outbox: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self._lock = asyncio.Lock()

    def post(self, channel: str, message: dict[str, Any]) -> None:
        self._outbox.put_nowait((channel, message))

    async def run(self) -> None:
        helpers = [
            asyncio.create_task(self._send_loop(), name="console-relay-send"),
            asyncio.create_task(self._sweep_loop(), name="console-relay-sweep"),
        ]
        channel = relay_channel()
        log.info("console relay listening on %s", channel)
        try:
            while True:
                message = await self.layer.receive(channel)
                try:
                    async with self._lock:
                        await self.handle(message)
                except Exception:
                    log.exception("console relay: %s failed", message.get("type"))
        finally:
            for task in helpers:
                task.cancel()
            for hub in list(self.hubs.values()):
                await hub.close()
            self.hubs.clear()
            self.subs.clear()

    async def handle(self, message: dict[str, Any]) -> None:
        kind, vm_id, reply = message.get("type"), message.get("vm"), message.get("reply")
        if not isinstance(vm_id, str) or not isinstance(reply, str):
            return
        key = (vm_id, reply)
        if kind == "console.attach":
            sub = self.subs.get(key)
            if sub is not None:
                sub.last_seen = time.monotonic()
                return
            hub = self.hubs.get(vm_id)
            if hub is None:
                rt = runtime.runtime_dir(vm_id)
                hub = self.hubs[vm_id] = ConsoleHub(vm_id, rt.serial_socket, rt.serial_log)
            sub = self.subs[key] = _Remote(self, vm_id, reply)
            scrollback = await hub._attach(sub)
            self.post(reply, {"type": "console.attached", "vm": vm_id, "scrollback": scrollback})
        elif kind == "console.input":
            data, hub = message.get("data"), self.hubs.get(vm_id)
            if key not in self.subs or hub is None or not isinstance(data, bytes):
                return
            if not await hub.send_input(data):
                self.subs[key].notify(
                    {"type": "link", "connected": False, "reason": "input not delivered"}
                )
        elif kind == "console.detach":
            await self._drop(key)

    async def _drop(self, key: tuple[str, str]) -> None:
        sub = self.subs.pop(key, None)
        hub = self.hubs.get(key[0])
        if sub is not None and hub is not None and await hub._detach(sub):
            del self.hubs[key[0]]

    async def _send_loop(self) -> None:
        while True:
            channel, message = await self._outbox.get()
            try:
                for _ in range(SEND_RETRIES):
                    try:
                        await self.layer.send(channel, message)
                        break
                    except ChannelFull:  # a burst of output: give the consumer time to read
                        await asyncio.sleep(SEND_RETRY_S)
                else:
                    # A consumer that does not read (its process is gone, or it is far behind).
                    log.info("console relay: %s is not reading; detached", channel)
                    async with self._lock:
                        for key in [k for k in self.subs if k[1] == channel]:
                            await self._drop(key)
            except Exception:
                log.exception("console relay: send to %s failed", channel)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_S)
            cutoff = time.monotonic() - SUBSCRIBER_TTL_S
            async with self._lock:
                for key in [k for k, s in self.subs.items() if s.last_seen < cutoff]:
                    await self._drop(key)


KEEPALIVE_S = 5.0  # consumers re-send their attach this often
SUBSCRIBER_TTL_S = 3 * KEEPALIVE_S
RELAY_TIMEOUT_S = 5.0  # a consumer says "relay not answering" after this long without an answer
SEND_RETRIES, SEND_RETRY_S = 40, 0.05  # how long a full consumer channel is waited for (2 s)

# The relay of this process when it runs in the web process (``relay_placement() == "web"``).
_local: tuple[asyncio.AbstractEventLoop, asyncio.Task[None]] | None = None


async def ensure_relay() -> None:
    """Start this process's relay on the running loop, if consoles are relayed here."""
    global _local
    if relay_placement() != "web":
        return
    loop = asyncio.get_running_loop()
    if _local is None or _local[0] is not loop or _local[1].done():
        relay = Relay(get_channel_layer())
        _local = (loop, loop.create_task(relay.run(), name="console-relay"))


async def stop_relay() -> None:
    """Stop this process's relay (tests)."""
    global _local
    if _local is not None and _local[0] is asyncio.get_running_loop():
        _local[1].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await _local[1]
    _local = None


def run_relay_thread() -> threading.Thread:
    """The relay of a worker host, in a daemon thread with its own event loop."""

    def main() -> None:
        while True:
            try:
                asyncio.run(Relay(get_channel_layer()).run())
            except Exception:
                log.exception("console relay stopped; restarting")
                time.sleep(RECONNECT_S)

    thread = threading.Thread(target=main, name="console-relay", daemon=True)
    thread.start()
    return thread


# --- Recording (asciicast v2) -------------------------------------------------------------------


class Recording:
    """An asciicast v2 file: a header line, then ``[seconds, "o"|"i", text]`` lines.

    Callers on the event loop only append to memory; ``flush`` writes (and hashes) in a thread.
    """

    def __init__(
        self,
        path: Path,
        *,
        cols: int,
        rows: int,
        title: str,
        record_input: bool,
        now: Callable[[], float] = time.monotonic,
        masker: Masker = NO_MASKER,
    ) -> None:
        self.path = path
        # Masked for the guest's secrets before anything is written: what it prints and, when
        # recorded, what is typed (a value typed into the console too).
        self._out_mask = masker.stream()
        self._in_mask = masker.stream()
        self.record_input = record_input
        self._now = now
        self.started = now()
        self._pending: list[bytes] = []
        self._io_lock = threading.Lock()
        self._sha = hashlib.sha256()
        self.size = 0
        self.output_bytes = 0
        self.input_bytes = 0
        self._out = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._in = codecs.getincrementaldecoder("utf-8")(errors="replace")
        header = {
            "version": 2,
            "width": cols,
            "height": rows,
            "timestamp": int(datetime.now(UTC).timestamp()),
            "title": title,
            "env": {"TERM": "xterm-256color", "SHELL": "/bin/bash"},
        }
        self._pending.append(_line(header))

    def _frame(self, kind: str, text: str) -> None:
        if text:
            self._pending.append(_line([round(self._now() - self.started, 6), kind, text]))

    def output(self, chunk: bytes) -> None:
        self.output_bytes += len(chunk)
        self._frame("o", self._out.decode(self._out_mask.feed(chunk)))

    def input(self, chunk: bytes) -> None:
        self.input_bytes += len(chunk)
        if self.record_input:
            self._frame("i", self._in.decode(self._in_mask.feed(chunk)))

    def _write(self, final: bool) -> None:
        with self._io_lock:
            if final:
                self._frame("o", self._out.decode(self._out_mask.flush(), final=True))
                if self.record_input:
                    self._frame("i", self._in.decode(self._in_mask.flush(), final=True))
            batch, self._pending = self._pending, []
            if not batch:
                return
            data = b"".join(batch)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as fh:
                fh.write(data)
            self._sha.update(data)
            self.size += len(data)

    async def flush(self, final: bool = False) -> None:
        await asyncio.to_thread(self._write, final)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    @property
    def duration_s(self) -> float:
        return round(self._now() - self.started, 3)


def _line(value: object) -> bytes:
    return (json.dumps(value, ensure_ascii=False, separators=(", ", ": ")) + "\n").encode()


def masker_for_vm(vm_id: str | uuid.UUID) -> Masker:
    """The masker for what comes out of a VM's guest: every secret it was given."""
    seen = VirtualMachine.objects.filter(pk=vm_id).values_list("secrets_seen", flat=True).first()
    return guests.masker_for_records(seen or [])


def new_recording_path(vm_id: str, session: str) -> tuple[Path, str]:
    """(absolute path, path relative to the console directory, as events reference it)."""
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    relative = f"{vm_id}/{day}-{session}.cast"
    return console_dir() / relative, relative


def resolve_recording(relative: str) -> Path | None:
    """The file an event references, refusing anything outside the console directory."""
    root = console_dir().resolve()
    path = (root / relative).resolve()
    if root not in path.parents:
        return None
    return path


# --- Commands: the events of a console session --------------------------------------------------


def session_actor(user: Any, scope: dict[str, Any]) -> Actor:
    """The user actor of a websocket session (no HTTP request context here)."""
    client = scope.get("client") or (None, None)
    return Actor(
        kind="user",
        user_id=user.pk,
        username=user.username,
        channel="dashboard",
        source_ip=client[0],
        request_id=uuid.uuid4().hex,
    )


def record_opened(
    actor: Actor, vm_id: str, *, session: str, mode: Mode, recording: str, cols: int, rows: int
) -> store.RecordedEvent:
    # The watcher's role as it is when the session opens (an auditor watching is not a
    # "viewer"): "mode" says only whether the session may type.
    user = User.objects.filter(pk=actor.user_id).first() if actor.user_id else None
    return commands.record_console_opened(
        actor,
        vm_id,
        {
            "session": session,
            "mode": "operator" if mode == "write" else "viewer",
            "role": roles.role_of(user) if user is not None else "",
            "recording": recording,
            "format": "asciicast-v2",
            "cols": cols,
            "rows": rows,
        },
    )


def record_closed(
    actor: Actor,
    vm_id: str,
    *,
    session: str,
    opened_event_id: str,
    recording: str,
    size: int,
    sha256: str,
    duration_s: float,
    input_bytes: int,
    output_bytes: int,
    ignored_input_bytes: int,
) -> store.RecordedEvent:
    return commands.record_console_closed(
        actor,
        vm_id,
        opened_event_id,
        {
            "session": session,
            "recording": recording,
            "format": "asciicast-v2",
            "size": size,
            "sha256": sha256,
            "duration_s": duration_s,
            "input_bytes": input_bytes,
            "output_bytes": output_bytes,
            "ignored_input_bytes": ignored_input_bytes,
        },
    )
