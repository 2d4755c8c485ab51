"""The wire logic, without I/O: every operation is a generator that yields what it needs done
(``Call``: one HTTP request; ``Sleep``: a pause between polls) and is sent the answer
(``Reply``). The sync and async clients only run these generators (``run`` in each), so both
speak the API the same way: the same requests, the same waits on a request's status, the same
errors, the same checksum checks."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from sandbox_sdk.errors import (
    AuthError,
    ChecksumMismatch,
    Conflict,
    NotFound,
    RequestFailed,
    SandboxError,
    TooLarge,
    WaitTimeout,
    error_from,
)

API = "/api/v1"
DEFAULT_WAIT_S = 300.0
POLL_FIRST_S = 0.1
POLL_MAX_S = 1.0
RETRIES = 4  # idempotent calls: attempts after the first, on 503 or a connection error
CHUNK = 1 << 16


@dataclass(frozen=True)
class Call:
    """One HTTP request. ``idempotent`` calls are retried with back-off on 503 and on
    connection errors; others never (a POST may have been carried out)."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    upload: Path | bytes | None = None  # the raw body (a file is streamed from disk)
    download: Path | None = None  # stream the body to this file (the reply carries its digest)
    ok: tuple[int, ...] = (200,)
    wait_s: float | None = None  # how long the server may take (beyond the client's timeout)
    # At most this many bytes of a body (not streamed to a file) are read: past it the client
    # stops reading and the reply's ``size`` is what the server announced (``check`` refuses).
    limit: int | None = None

    @property
    def idempotent(self) -> bool:
        return self.method in ("GET", "HEAD", "PUT")


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    sha256: str | None = None  # of a body streamed to a file
    size: int = 0  # of the whole body (announced by the server when it was not all read)

    def json(self) -> Any:
        if not self.body:
            return None
        try:
            return json.loads(self.body)
        except ValueError:
            return {"detail": self.body[:500].decode(errors="replace")}


Op = Generator[Call | Sleep, Any, Any]


@dataclass(frozen=True)
class Config:
    url: str
    token: str
    timeout: float = 60.0  # per HTTP request (exec adds its own timeout)

    @classmethod
    def resolve(cls, url: str | None = None, token: str | None = None) -> Config:
        """Arguments first, then ``SANDBOX_URL`` and ``SANDBOX_TOKEN``, then the file that
        ``sandbox login`` writes."""
        stored: dict[str, Any] = {}
        if not (url or os.environ.get("SANDBOX_URL")) or not (
            token or os.environ.get("SANDBOX_TOKEN")
        ):
            stored = load_stored()
        token = token or os.environ.get("SANDBOX_TOKEN") or stored.get("token")
        url = server_url(url, stored)
        if not token:
            raise AuthError("no token: set SANDBOX_TOKEN, pass token=, or run `sandbox login`")
        return cls(url=url, token=token)

    def ws_url(self, path: str) -> str:
        parts = urlsplit(self.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, "", ""))

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}


def server_url(url: str | None = None, stored: dict[str, Any] | None = None) -> str:
    """The server's URL: the argument, else ``SANDBOX_URL``, else the ``sandbox login`` file."""
    if not (url or os.environ.get("SANDBOX_URL")) and stored is None:
        stored = load_stored()
    url = url or os.environ.get("SANDBOX_URL") or (stored or {}).get("url")
    if not url:
        raise AuthError("no server: set SANDBOX_URL, pass url=, or run `sandbox login`")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SandboxError(f"not an http(s) URL: {url!r}")
    return url.rstrip("/")


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "microvm-sandbox" / "config.json"


def load_stored() -> dict[str, Any]:
    try:
        data = json.loads(config_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def store(url: str, token: str) -> Path:
    """Write the login file, readable by its owner only (0600 from its creation)."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)
        json.dump({"url": url, "token": token}, fh)
    return path


def backoff(attempt: int) -> float:
    """Seconds before retry ``attempt`` (1, 2, ...): 0.2, 0.4, 0.8, ... capped at 5."""
    return min(5.0, 0.2 * 2 ** (attempt - 1))


def check(reply: Reply, call: Call) -> Any:
    if reply.status not in call.ok:
        raise error_from(reply.status, reply.json())
    size = max(reply.size, len(reply.body))
    if call.limit is not None and size > call.limit:
        raise TooLarge(
            f"{size} bytes: more than the {call.limit} allowed", size=size, limit=call.limit
        )
    return reply.json() if call.download is None else None


def announced_size(headers: Any, read: int) -> int:
    """A body's size: its Content-Length when the server gave one, at least what was read."""
    announced = str(headers.get("content-length") or "")
    return max(int(announced), read) if announced.isdigit() else read


def request(call: Call) -> Op:
    reply: Reply = yield call
    return check(reply, call)


# --- Requests and their status ----------------------------------------------------------------


def wait(status_url: str, timeout: float | None) -> Op:
    """Poll a request's status until it succeeded (its status body) or failed
    (``RequestFailed`` with the outcome event's reason)."""
    limit = DEFAULT_WAIT_S if timeout is None else timeout
    deadline = time.monotonic() + limit
    delay = POLL_FIRST_S
    path = status_url.removeprefix(API) if status_url.startswith(API) else status_url
    while True:
        status = yield from request(Call("GET", path))
        if status["state"] == "succeeded":
            return status
        if status["state"] == "failed":
            outcome = status.get("outcome") or {}
            data = outcome.get("data") or {}
            reason = data.get("reason") or data.get("error") or "no reason given"
            raise RequestFailed(f"{outcome.get('type', 'request')}: {reason}", outcome=outcome)
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"request still pending after {limit:g} s: {status_url}")
        yield Sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(POLL_MAX_S, delay * 2)


def accepted(body: dict[str, Any], wait_for: bool, timeout: float | None) -> Op:
    """After a 201/202: wait for the request (unless told not to); the VM as it then is."""
    if wait_for:
        status = yield from wait(body["status_url"], timeout)
        if status.get("vm"):
            body = {**body, "vm": status["vm"]}
    return body


# --- VMs --------------------------------------------------------------------------------------


def new_name() -> str:
    return f"sbx-{secrets.token_hex(4)}"


def create_vm(
    *,
    name: str | None,
    template: str,
    start: bool = True,
    vcpus: int | None = None,
    memory_mib: int | None = None,
    disk_mib: int | None = None,
    network: str | None = None,
    budget: str | None = None,
    lifetime_s: int | None = None,
    wait_for: bool = True,
    timeout: float | None = None,
) -> Op:
    """``lifetime_s``: seconds until the server stops or destroys it (0: none; None: its
    template's); ``timeout``: how long to wait for it to run."""
    payload: dict[str, Any] = {"name": name or new_name(), "template": template, "start": start}
    for key, value in (
        ("vcpus", vcpus),
        ("memory_mib", memory_mib),
        ("disk_mib", disk_mib),
        ("network", network),
        ("budget", budget),
        ("timeout_s", lifetime_s),
    ):
        if value is not None:
            payload[key] = value
    body = yield from request(Call("POST", "/vms/", json=payload, ok=(201, 202)))
    body = yield from accepted(body, wait_for, timeout)
    return body["vm"]


def get_vm(vm_id: str) -> Op:
    return (yield from request(Call("GET", f"/vms/{_id(vm_id)}/")))


UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def find_vm(ref: str) -> Op:
    """A VM by id, or by its exact name among the live VMs the caller sees (``NotFound``;
    ``Conflict`` when several share the name)."""
    if UUID.match(ref):
        return (yield from get_vm(ref))
    rows = [r for r in (yield from list_vms(name=ref)) if r["name"] == ref]
    if not rows:
        raise NotFound(f"no VM named {ref!r}")
    if len(rows) > 1:
        raise Conflict(f"{len(rows)} VMs are named {ref!r}: give the id")
    return rows[0]


def list_all(path: str, params: dict[str, Any] | None = None, limit: int | None = None) -> Op:
    """Every row of a paginated list (``limit``: at most that many)."""
    rows: list[Any] = []
    offset = 0
    while True:
        page_params = {**(params or {}), "limit": 100, "offset": offset}
        page = yield from request(Call("GET", path, params=page_params))
        results = page["results"] if isinstance(page, dict) else page
        rows.extend(results)
        offset += len(results)
        if limit is not None and len(rows) >= limit:
            return rows[:limit]
        if not isinstance(page, dict) or not page.get("next") or not results:
            return rows


def list_vms(**filters: Any) -> Op:
    params = {k: v for k, v in filters.items() if v is not None}
    return (yield from list_all("/vms/", params))


VERBS_WITH_BODY = ("stop", "resize", "snapshot")


def vm_action(
    vm_id: str, verb: str, body: dict[str, Any] | None, wait_for: bool, timeout: float | None
) -> Op:
    """``POST /vms/{id}/<verb>/``: start, stop, reboot, pause, resume, resize, snapshot."""
    path = f"/vms/{_id(vm_id)}/{verb}/"
    answer = yield from request(Call("POST", path, json=body or {}, ok=(202,)))
    return (yield from accepted(answer, wait_for, timeout))


def destroy_vm(vm_id: str, wait_for: bool, timeout: float | None) -> Op:
    answer = yield from request(Call("DELETE", f"/vms/{_id(vm_id)}/", ok=(202,)))
    return (yield from accepted(answer, wait_for, timeout))


# --- Snapshots --------------------------------------------------------------------------------


def list_snapshots(vm_id: str | None = None) -> Op:
    return (yield from list_all("/snapshots/", {"vm_id": vm_id} if vm_id else None))


def get_snapshot(snapshot_id: str) -> Op:
    return (yield from request(Call("GET", f"/snapshots/{_id(snapshot_id)}/")))


def restore(snapshot_id: str, wait_for: bool, timeout: float | None) -> Op:
    path = f"/snapshots/{_id(snapshot_id)}/restore/"
    answer = yield from request(Call("POST", path, json={}, ok=(202,)))
    return (yield from accepted(answer, wait_for, timeout))


def clone(
    snapshot_id: str,
    name: str | None,
    wait_for: bool,
    timeout: float | None,
    lifetime_s: int | None = None,
) -> Op:
    path = f"/snapshots/{_id(snapshot_id)}/clone/"
    body: dict[str, Any] = {"name": name or new_name()}
    if lifetime_s is not None:
        body["timeout_s"] = lifetime_s
    answer = yield from request(Call("POST", path, json=body, ok=(202,)))
    return (yield from accepted(answer, wait_for, timeout))


def fork_status(status_url: str) -> Op:
    """A fork's progress (its ``fork_status_url``): ``count``, ``running``, ``failed``,
    ``pending``, ``settled``, ``done`` and the new VMs the caller sees."""
    path = status_url.removeprefix(API) if status_url.startswith(API) else status_url
    return (yield from request(Call("GET", path)))


def wait_fork(
    status_url: str, timeout: float | None, progress: Callable[[dict[str, Any]], None] | None
) -> Op:
    """Poll a fork's status until none of its VMs is pending (its last status), calling
    ``progress`` with each status read; ``WaitTimeout`` after ``timeout`` seconds."""
    limit = DEFAULT_WAIT_S if timeout is None else timeout
    deadline = time.monotonic() + limit
    delay = POLL_FIRST_S
    while True:
        status = yield from fork_status(status_url)
        if progress is not None:
            progress(status)
        if status["done"]:
            return status
        if time.monotonic() >= deadline:
            raise WaitTimeout(
                f"fork still has {status['pending']} of {status['count']} VMs pending after "
                f"{limit:g} s: {status_url}"
            )
        yield Sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(POLL_MAX_S, delay * 2)


def fork(
    vm_id: str,
    count: int,
    names: list[str] | None,
    wait_for: bool,
    timeout: float | None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> Op:
    """``count`` new VMs from the VM's running state (one snapshot, a restore each): the new
    VMs (as they are once each restore succeeded, unless ``wait_for`` is false). While waiting,
    ``progress`` is called with each read of the whole fork's status (k of N settled), when the
    server names one (``fork_status_url``); a failed restore raises ``RequestFailed``."""
    body: dict[str, Any] = {"count": count}
    if names is not None:
        body["names"] = names
    path = f"/vms/{_id(vm_id)}/fork/"
    answer = yield from request(Call("POST", path, json=body, ok=(202,)))
    if wait_for and answer.get("fork_status_url"):
        # The whole fork first (its VMs restore side by side); each VM's own status then
        # answers at once, and says why, if its restore failed.
        yield from wait_fork(answer["fork_status_url"], timeout, progress)
    made: list[dict[str, Any]] = []
    for vm in answer["vms"]:
        if wait_for:
            status = yield from wait(vm["status_url"], timeout)
            made.append(status.get("vm") or (yield from get_vm(vm["id"])))
        else:
            made.append((yield from get_vm(vm["id"])))
    return made


def set_idle(vm_id: str, seconds: int | None, to_disk: bool = False) -> Op:
    """The VM's idle policy: paused after ``seconds`` without exec, file transfer or console
    input (None: never); the next exec or file request resumes it. ``to_disk``: that pause
    suspends it to disk (its memory saved to a file and freed on the host)."""
    path = f"/vms/{_id(vm_id)}/idle/"
    body = {"idle_timeout_s": seconds, "idle_to_disk": to_disk}
    return (yield from request(Call("POST", path, json=body)))


def set_lifetime(vm_id: str, seconds: int) -> Op:
    """End the VM's lifetime ``seconds`` from now (0 clears it): the server's answer
    (``timeout_s``, ``expires_at``, ``on_expiry``, ``event_position``)."""
    path = f"/vms/{_id(vm_id)}/lifetime/"
    return (yield from request(Call("POST", path, json={"timeout_s": seconds})))


def delete_snapshot(snapshot_id: str) -> Op:
    yield from request(Call("DELETE", f"/snapshots/{_id(snapshot_id)}/", ok=(204,)))


# --- Guest access -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExecResult:
    exit_code: int | None
    stdout: str
    stderr: str
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    signal: int | None = None
    timed_out: bool = False
    duration_s: float = 0.0
    truncated: bool = False
    # The whole output's sizes as the guest wrote it (more than the bytes above when truncated).
    stdout_size: int = 0
    stderr_size: int = 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def exec_body(
    argv: Iterable[str] | str,
    stdin: str | bytes | None,
    env: dict[str, str] | None,
    cwd: str | None,
    timeout: float | None,
) -> dict[str, Any]:
    if isinstance(argv, str):
        argv = ["sh", "-c", argv]
    body: dict[str, Any] = {"argv": list(argv)}
    if isinstance(stdin, bytes):
        body["stdin_b64"] = base64.b64encode(stdin).decode()
    elif stdin is not None:
        body["stdin"] = stdin
    if env:
        body["env"] = dict(env)
    if cwd:
        body["cwd"] = cwd
    if timeout is not None:
        body["timeout"] = timeout
    return body


def run_exec(vm_id: str, body: dict[str, Any]) -> Op:
    call = Call("POST", f"/vms/{_id(vm_id)}/exec/", json=body, wait_s=body.get("timeout", 60.0))
    answer = yield from request(call)
    out = base64.b64decode(answer.get("stdout_b64") or "")
    err = base64.b64decode(answer.get("stderr_b64") or "")
    return ExecResult(
        exit_code=answer.get("exit_code"),
        stdout=answer.get("stdout", ""),
        stderr=answer.get("stderr", ""),
        stdout_bytes=out,
        stderr_bytes=err,
        signal=answer.get("signal"),
        timed_out=bool(answer.get("timed_out")),
        duration_s=float(answer.get("duration_s") or 0.0),
        truncated=bool(answer.get("truncated")),
        stdout_size=int(answer.get("stdout_size") or len(out)),
        stderr_size=int(answer.get("stderr_size") or len(err)),
    )


def exec_ws_path(vm_id: str) -> str:
    return f"/ws/vms/{_id(vm_id)}/exec/"


@dataclass(frozen=True)
class Chunk:
    """Output of a streamed exec as it comes: ``stream`` is "stdout" or "stderr"."""

    stream: str
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")


@dataclass
class ExecStatus:
    """The end of a streamed exec (its frames' ``exit``)."""

    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    duration_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# Close codes of the websockets (docs/accounts.md) as the HTTP statuses they stand for.
CLOSE_STATUS = {4401: 401, 4403: 403, 4404: 404}


def parse_frame(text: str | bytes) -> Chunk | ExecStatus:
    """One frame of the exec websocket: output, the exit, or an error (raised)."""
    frame = json.loads(text)
    kind = frame.get("type")
    if kind in ("stdout", "stderr"):
        return Chunk(kind, base64.b64decode(frame.get("b64") or ""))
    if kind == "exit":
        return ExecStatus(
            exit_code=frame.get("exit_code"),
            signal=frame.get("signal"),
            timed_out=bool(frame.get("timed_out")),
            duration_s=float(frame.get("duration_s") or 0.0),
            extra=frame,
        )
    if kind == "error":
        raise error_from(int(frame.get("status") or 502), {"detail": frame.get("detail")})
    raise SandboxError(f"unexpected frame from the exec websocket: {kind!r}")


def closed_error(code: int | None) -> SandboxError:
    status = CLOSE_STATUS.get(code or 0)
    if status is not None:
        return error_from(status, {"detail": f"the websocket was closed ({code})"})
    return SandboxError(f"the websocket closed ({code})")


def console_ws_path(vm_id: str, cols: int, rows: int) -> str:
    return f"/ws/vms/{_id(vm_id)}/console/?cols={int(cols)}&rows={int(rows)}"


def parse_console_frame(frame: str | bytes) -> bytes | dict[str, Any]:
    """A console frame: terminal bytes (binary), or a status message (text: JSON)."""
    if isinstance(frame, bytes):
        return frame
    try:
        message = json.loads(frame)
    except ValueError:
        return {"type": "unknown", "text": frame}
    return message if isinstance(message, dict) else {"type": "unknown", "text": frame}


def files_path(vm_id: str) -> str:
    return f"/vms/{_id(vm_id)}/files/"


def upload(vm_id: str, remote: str, data: bytes | Path, sha256: str) -> Op:
    """PUT the bytes (or the file) to ``remote``; the server's SHA-256 must be ``sha256``."""
    call = Call("PUT", files_path(vm_id), params={"path": remote}, upload=data, ok=(201,))
    stored = yield from request(call)
    if stored.get("sha256") != sha256:
        raise ChecksumMismatch(
            f"{remote}: the server stored SHA-256 {stored.get('sha256')}, sent {sha256}"
        )
    return stored


def download(vm_id: str, remote: str, local: Path | None, limit: int | None = None) -> Op:
    """GET ``remote`` (into ``local`` when given): the bytes (or None), checked against the
    ``X-Content-SHA256`` the server reports. With ``limit``, a file of more bytes than that is
    ``TooLarge`` (and only that many are read of it)."""
    call = Call("GET", files_path(vm_id), params={"path": remote}, download=local, limit=limit)
    data, _ = yield from checked_download(call, remote)
    return data


def checked_download(call: Call, remote: str) -> Op:
    """The body (None when streamed to a file) and its SHA-256, which must be the one the
    server reports (``X-Content-SHA256``)."""
    local = call.download
    reply: Reply = yield call
    try:
        check(reply, call)
    except TooLarge as exc:
        raise TooLarge(f"{remote} is {exc}", size=exc.size, limit=exc.limit) from None
    reported = reply.headers.get("x-content-sha256")
    got = reply.sha256
    if got is None:
        got = hashlib.sha256(reply.body).hexdigest()
    if not reported or reported != got:
        raise ChecksumMismatch(f"{remote}: received SHA-256 {got}, the server reports {reported}")
    return (None if local is not None else reply.body), got


# --- Audit exports ----------------------------------------------------------------------------

EXPORT_KINDS = ("report", "bundle")


def start_export(kind: str, body: dict[str, Any]) -> Op:
    """``POST /audit/reports/`` or ``/audit/bundles/``: the export job (201 done, 202 queued)."""
    if kind not in EXPORT_KINDS:
        raise SandboxError(f"an export is a report or a bundle, not {kind!r}")
    return (yield from request(Call("POST", f"/audit/{kind}s/", json=body, ok=(201, 202))))


def export_job(job_id: str) -> Op:
    return (yield from request(Call("GET", f"/audit/exports/{_id(job_id)}/")))


def download_export(job: dict[str, Any], local: Path) -> Op:
    """The finished export's file into ``local``, checked against the job's SHA-256 and the
    download's ``X-Content-SHA256``."""
    call = Call("GET", f"/audit/exports/{_id(str(job['id']))}/download/", download=local)
    _, digest = yield from checked_download(call, str(job.get("file_name") or job["id"]))
    if job.get("sha256") and digest != job["sha256"]:
        raise ChecksumMismatch(f"{local}: SHA-256 {digest}, the export job says {job['sha256']}")


# --- Events -----------------------------------------------------------------------------------


def events_after(after: int | None, params: dict[str, Any] | None = None) -> Op:
    query = {**(params or {}), "limit": 200}
    if after is not None:
        query["after"] = after
    page = yield from request(Call("GET", "/events/", params=query))
    return page["results"] if isinstance(page, dict) else page


def _id(value: str) -> str:
    return quote(str(value), safe="")
