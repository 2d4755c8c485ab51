"""``ws/vms/<id>/exec/``: run one command in the guest and stream its output as it comes.

The client sends one JSON message ``{"argv": [...], "cwd", "env", "stdin", "timeout",
"secrets"}`` (validated like the HTTP exec; the output is masked for secrets the same way); the
server answers with ``{"type": "stdout"|"stderr", "data": <text>,
"b64": <base64>}`` frames while the command runs and a final ``{"type": "exit", "exit_code",
"signal", "timed_out", "duration_s", "event_position"}``, then closes. Errors are
``{"type": "error", "status", "detail"}`` frames followed by a close. The command runs in a thread
(the agent client is synchronous); its chunks are handed to the event loop through a bounded
queue, so the consumer never blocks and a slow client holds the command back (the agent channel
passes the backpressure on to the guest) instead of piling its output up in the server; a
disconnect cancels the forwarding task. The caller is checked again when the command comes
(``accounts.authentication.recheck_socket``): a token revoked or a user deactivated or demoted
since the handshake closes the socket (4401, 4403) and nothing runs.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import close_old_connections, connections

from accounts.authentication import recheck_socket, socket_refused
from accounts.caller import Caller
from accounts.models import APIToken
from audit.actor import Actor
from audit.errors import EventStoreUnavailable
from core import context, parsers
from vms import commands, guest, policy
from vms.agent.client import AgentError, AgentTimeout
from vms.api import ExecSerializer
from vms.models import VirtualMachine

STREAM_QUEUE_FRAMES = 64  # output chunks (up to 64 KiB each) waiting for the websocket


class ExecConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        if await socket_refused(self.scope, policy.scope_of("exec"), write=True):
            await self.close(code=4403)
            return
        self.vm = await self._visible_vm(self.scope["url_route"]["kwargs"]["vm_id"])
        if self.vm is None:
            await self.close(code=4404)
            return
        self.started = False
        self.forwarder: asyncio.Task[None] | None = None
        await self.accept()

    def _caller(self) -> Caller:
        """The socket's user, through its API token if any (its scopes narrow what it reaches)."""
        user = self.scope["user"]
        token = self.scope.get("auth")
        token = token if isinstance(token, APIToken) else None
        return Caller(
            user=user,
            token=token,
            actor=Actor.for_user(user, channel="api", token_id=getattr(token, "key", "")),
        )

    @database_sync_to_async
    def _visible_vm(self, vm_id: str) -> Any:
        return policy.visible_vms(self._caller()).filter(pk=vm_id).first()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.started:
            await self._error(409, "one command per connection")
            return
        self.started = True
        # The socket was authorised at its handshake; the command runs now: the token must
        # still be live, the user still active and still allowed to reach the VM.
        code = await database_sync_to_async(recheck_socket)(self.scope)
        if code is None and await self._visible_vm(str(self.vm.pk)) is None:
            code = 4403
        if code is not None:
            await self.close(code=code)
            return
        try:
            request = parsers.loads(text_data or "")  # ValueError also when nested too deep
        except ValueError:
            await self._error(400, "send one JSON object")
            return
        s = ExecSerializer(data=request)
        if not s.is_valid():
            await self._error(400, s.errors)
            return
        queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue(STREAM_QUEUE_FRAMES)
        loop = asyncio.get_running_loop()
        forwarder = self.forwarder = asyncio.create_task(self._forward(queue))

        def emit(stream: str) -> Any:
            def put(chunk: bytes) -> None:
                # On the command's thread: wait for room, unless nobody forwards any more.
                future = asyncio.run_coroutine_threadsafe(queue.put((stream, chunk)), loop)
                while True:
                    try:
                        future.result(timeout=0.5)
                        return
                    except concurrent.futures.TimeoutError:
                        if forwarder.done():
                            future.cancel()
                            return

            return put

        try:
            result = await asyncio.to_thread(
                self._run, s.validated_data, emit("stdout"), emit("stderr")
            )
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error frame
            await self._end_forwarding(queue)
            await self._error(*_status_of(exc))
            return
        await self._end_forwarding(queue)
        await self.send(
            text_data=json.dumps(
                {
                    "type": "exit",
                    "exit_code": result.exit_code,
                    "signal": result.signal,
                    "timed_out": result.timed_out,
                    "duration_s": result.duration_s,
                    "stdout_size": result.stdout_size,
                    "stderr_size": result.stderr_size,
                    "event_position": result.event_position,
                }
            )
        )
        await self.close()

    def _run(self, data: dict[str, Any], on_stdout: Any, on_stderr: Any) -> Any:
        close_old_connections()
        try:
            client = self.scope.get("client") or (None, None)
            with context.bind(
                channel="api", source_ip=client[0], request_id=context.new_request_id()
            ):
                vm = VirtualMachine.objects.get(pk=self.vm.pk)
                return guest.run_exec(
                    self._caller(),  # in the request context bound above
                    vm,
                    data["argv"],
                    cwd=data.get("cwd"),
                    env=data.get("env"),
                    stdin=data.get("stdin_bytes"),
                    timeout=data["timeout"],
                    secrets=data.get("secrets"),
                    on_stdout=on_stdout,
                    on_stderr=on_stderr,
                    keep=0,  # all of it went out as frames
                )
        finally:
            # This runs in an executor thread: its connection is its own, close it.
            connections.close_all()

    async def _end_forwarding(self, queue: asyncio.Queue[tuple[str, bytes] | None]) -> None:
        forwarder = self.forwarder
        if forwarder is None:
            return
        if not forwarder.done():
            await queue.put(None)
        with contextlib.suppress(asyncio.CancelledError):
            await forwarder

    async def _forward(self, queue: asyncio.Queue[tuple[str, bytes] | None]) -> None:
        while (item := await queue.get()) is not None:
            stream, chunk = item
            await self.send(
                text_data=json.dumps(
                    {
                        "type": stream,
                        "data": chunk.decode(errors="replace"),
                        "b64": base64.b64encode(chunk).decode(),
                    }
                )
            )

    async def _error(self, status: int, detail: Any) -> None:
        await self.send(text_data=json.dumps({"type": "error", "status": status, "detail": detail}))
        await self.close()

    async def disconnect(self, code: int) -> None:
        forwarder = getattr(self, "forwarder", None)
        if forwarder is not None and not forwarder.done():
            forwarder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await forwarder


def _status_of(exc: Exception) -> tuple[int, str]:
    """The status and detail of an error frame, as the HTTP exec would answer."""
    if isinstance(exc, EventStoreUnavailable):
        return 503, "The audit log cannot record this action now; nothing was done."
    if isinstance(exc, PermissionDenied):
        return 403, str(exc)
    if isinstance(exc, ValidationError):
        return 400, "; ".join(exc.messages)
    if isinstance(exc, commands.InvalidState):
        return 409, str(exc)
    if isinstance(exc, guest.GuestUnavailable):
        return 503, str(exc)
    if isinstance(exc, AgentTimeout):
        return 504, f"the guest agent timed out: {exc}"
    if isinstance(exc, AgentError):
        return 502, f"the guest agent refused: {exc}"
    return 502, f"{type(exc).__name__}: {exc}"
