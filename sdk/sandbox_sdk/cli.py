"""``sandbox``: the command line of MicroVM Sandbox, over the SDK (docs/cli.md).

Exit codes (``EXIT``): 0 done; 1 any other error; 2 usage; 3 not found; 4 forbidden; 5 conflict
(the VM's state); 6 quota; 7 unavailable (503 or unreachable); 8 not authenticated; 9 a wait
timed out; 10 the request failed. ``vm exec`` exits with the guest command's own code (124 when
it timed out, 128 + N when signal N ended it). Errors are one line on stderr: ``sandbox: ...``.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import click
import yaml
from click.shell_completion import get_completion_class

from sandbox_sdk import _core
from sandbox_sdk._core import Config
from sandbox_sdk.errors import (
    AuthError,
    Conflict,
    Forbidden,
    NotFound,
    QuotaExceeded,
    RequestFailed,
    SandboxError,
    Unavailable,
    WaitTimeout,
)
from sandbox_sdk.sync import Client, Sandbox

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT = {
    NotFound: 3,
    QuotaExceeded: 6,  # before Forbidden: a quota refusal is a 403 too
    Forbidden: 4,
    Conflict: 5,
    Unavailable: 7,
    AuthError: 8,
    WaitTimeout: 9,
    RequestFailed: 10,
}
EXIT_EXEC_TIMED_OUT = 124

UUID = _core.UUID

VM_COLUMNS = ("id", "name", "state", "template", "vcpus", "memory_mib", "ip", "created_at")
SNAPSHOT_COLUMNS = ("id", "name", "vm_name", "state", "size_bytes", "created_at")
EVENT_COLUMNS = ("position", "recorded_at", "type", "aggregate_type", "aggregate_id", "actor_name")


def exit_code_of(exc: SandboxError) -> int:
    for kind, code in EXIT.items():
        if isinstance(exc, kind):
            return code
    return EXIT_ERROR


def fail(exc: SandboxError) -> NoReturn:
    message = " ".join(str(exc).split())  # one line, whatever the server said
    click.echo(f"sandbox: {message}", err=True)
    sys.exit(exit_code_of(exc))


class Group(click.Group):
    """Turns the SDK's errors into one line on stderr and the exit code of their kind."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SandboxError as exc:
            fail(exc)


class State:
    def __init__(self, url: str | None, token: str | None, output: str) -> None:
        self.url, self.token, self.output = url, token, output
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.url, self.token)
        return self._client

    def sandbox(self, ref: str) -> Sandbox:
        """A VM by id, or by its exact name among the caller's live VMs."""
        return Sandbox(self.client, self.client.run(_core.find_vm(ref)), keep=True)

    def snapshot_id(self, ref: str) -> str:
        if UUID.match(ref):
            return ref
        rows = [s for s in self.client.run(_core.list_snapshots()) if s["name"] == ref]
        if len(rows) != 1:
            raise NotFound(f"no single snapshot named {ref!r}: give the id")
        return str(rows[0]["id"])


pass_state = click.make_pass_decorator(State)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def render(state: State, data: Any, columns: Sequence[str]) -> None:
    """Rows (or one row) as a table, JSON or YAML."""
    if state.output == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    if state.output == "yaml":
        click.echo(yaml.safe_dump(data, sort_keys=True, default_flow_style=False).rstrip())
        return
    if isinstance(data, dict):  # one object: key and value per line
        width = max((len(k) for k in data), default=0)
        for key in sorted(data):
            click.echo(f"{key.ljust(width)}  {_cell(data[key])}")
        return
    click.echo(table(data, columns))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[c.upper() for c in columns]]
    cells += [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", envvar="SANDBOX_URL", help="the server (default: SANDBOX_URL, then login)")
@click.option("--token", envvar="SANDBOX_TOKEN", help="an API token (default: SANDBOX_TOKEN)")
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json", "yaml"]),
    default="table",
    show_default=True,
)
@click.version_option(package_name="microvm-sandbox-sdk")
@click.pass_context
def cli(ctx: click.Context, url: str | None, token: str | None, output: str) -> None:
    """MicroVM Sandbox from the command line."""
    ctx.obj = State(url, token, output)


@cli.command()
@click.option("--url", "login_url", prompt="Server URL", help="e.g. http://127.0.0.1:8000")
@click.option("--token", "login_token", prompt="API token", hide_input=True)
@pass_state
def login(state: State, login_url: str, login_token: str) -> None:
    """Check a token against the server and store both (0600) for later commands."""
    with Client(login_url, login_token) as client:
        me = client.run(_core.request(_core.Call("GET", "/me/")))
    path = _core.store(client.config.url, login_token)
    click.echo(f"logged in to {client.config.url} as {me.get('username')} (stored in {path})")


# --- vm ---------------------------------------------------------------------------------------


@cli.group(cls=Group)
def vm() -> None:
    """VMs: list, create, drive, run commands, copy files."""


def wait_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--timeout", type=float, default=None, help="seconds to wait (default 300)")(f)
    return click.option("--no-wait", is_flag=True, help="return once the request is accepted")(f)


@vm.command("ls")
@click.option("-a", "--all", "everything", is_flag=True, help="destroyed VMs too")
@click.option("--state", "state_filter", default=None, help="only VMs in this state")
@pass_state
def vm_ls(state: State, everything: bool, state_filter: str | None) -> None:
    """List VMs."""
    filters: dict[str, Any] = {"state": state_filter}
    if everything:
        filters["include_destroyed"] = "true"
    rows = state.client.run(_core.list_vms(**filters))
    render(state, rows, VM_COLUMNS)


@vm.command("create")
@click.argument("name", required=False)
@click.option("-t", "--template", default="linux-default", show_default=True)
@click.option("--vcpus", type=int)
@click.option("--memory", "memory_mib", type=int, help="MiB")
@click.option("--disk", "disk_mib", type=int, help="MiB")
@click.option("--no-start", is_flag=True, help="create it stopped")
@click.option(
    "--lifetime",
    "lifetime_s",
    type=click.IntRange(min=0),
    help="seconds until the server stops or destroys it (0: never; default: its template's)",
)
@wait_options
@pass_state
def vm_create(
    state: State,
    name: str | None,
    template: str,
    vcpus: int | None,
    memory_mib: int | None,
    disk_mib: int | None,
    no_start: bool,
    lifetime_s: int | None,
    no_wait: bool,
    timeout: float | None,
) -> None:
    """Create a VM (and wait until it runs)."""
    op = _core.create_vm(
        name=name,
        template=template,
        start=not no_start,
        vcpus=vcpus,
        memory_mib=memory_mib,
        disk_mib=disk_mib,
        lifetime_s=lifetime_s,
        wait_for=not no_wait,
        timeout=timeout,
    )
    render(state, state.client.run(op), VM_COLUMNS)


@vm.command("show")
@click.argument("ref")
@pass_state
def vm_show(state: State, ref: str) -> None:
    """One VM (by id or name)."""
    render(state, state.sandbox(ref).info, VM_COLUMNS)


def _verb(name: str, help_text: str, extra: dict[str, Any] | None = None) -> None:
    @click.argument("ref")
    @wait_options
    @pass_state
    def command(state: State, ref: str, no_wait: bool, timeout: float | None, **kw: Any) -> None:
        sandbox = state.sandbox(ref)
        if name == "destroy":
            sandbox.destroy(wait=not no_wait, timeout=timeout)
        else:
            body = {k: v for k, v in kw.items() if v is not None and v is not False}
            answer = state.client.run(_core.vm_action(sandbox.id, name, body, not no_wait, timeout))
            sandbox.info = answer["vm"]
        render(state, sandbox.info, VM_COLUMNS)

    command.__doc__ = help_text
    for option in (extra or {}).values():
        command = option(command)
    vm.command(name)(command)


_verb("start", "Start a stopped VM.")
_verb(
    "stop",
    "Stop a VM (gracefully, then hard; --force skips the grace).",
    {"force": click.option("--force", is_flag=True)},
)
_verb("pause", "Pause a running VM.")
_verb("resume", "Resume a paused VM.")
_verb("reboot", "Reboot a running VM.")
_verb("destroy", "Destroy a VM (whatever its state).")


@vm.command("fork")
@click.argument("ref")
@click.option("-n", "--count", type=click.IntRange(min=1), default=1, show_default=True)
@wait_options
@pass_state
def vm_fork(state: State, ref: str, count: int, no_wait: bool, timeout: float | None) -> None:
    """COUNT new VMs from a running VM's state of now (memory and disk), each its own identity.
    Waits for all COUNT with a progress bar (k of COUNT settled) on stderr."""
    source = state.sandbox(ref)
    if no_wait:
        made = source.fork(count, keep=True, wait=False, timeout=timeout)
    else:
        with click.progressbar(length=count, label=f"forking {count}", file=sys.stderr) as bar:
            shown = 0

            def progress(status: dict[str, Any]) -> None:
                nonlocal shown
                settled = int(status.get("settled") or 0)
                bar.label = (
                    f"forking: {status.get('running', 0)} running, "
                    f"{status.get('failed', 0)} failed, {status.get('pending', 0)} pending"
                )
                bar.update(max(0, settled - shown))
                shown = max(shown, settled)

            made = source.fork(count, keep=True, wait=True, timeout=timeout, progress=progress)
    render(state, [m.info for m in made], VM_COLUMNS)


@vm.command("idle")
@click.argument("ref")
@click.argument("seconds")
@click.option(
    "--to-disk",
    is_flag=True,
    help="suspend it to disk instead (its memory saved to a file and freed on the host)",
)
@pass_state
def vm_idle(state: State, ref: str, seconds: str, to_disk: bool) -> None:
    """Pause a VM after SECONDS without exec, file transfer or console input ("off": never);
    the next exec or file request resumes it."""
    if seconds == "off":
        value: int | None = None
    else:
        try:
            value = int(seconds)
        except ValueError:
            raise click.BadParameter("whole seconds, or off", param_hint="SECONDS") from None
        if value < 1:
            raise click.BadParameter("at least 1, or off", param_hint="SECONDS")
    if to_disk and value is None:
        raise click.BadParameter("--to-disk needs SECONDS, not off", param_hint="--to-disk")
    render(
        state,
        state.sandbox(ref).set_idle(value, to_disk=to_disk),
        ["idle_timeout_s", "idle_to_disk", "event_position"],
    )


@vm.command("lifetime")
@click.argument("ref")
@click.argument("seconds", type=click.IntRange(min=0))
@pass_state
def vm_lifetime(state: State, ref: str, seconds: int) -> None:
    """End a VM's lifetime SECONDS from now (extend or shorten it; 0 clears it): the server then
    stops or destroys it, as its template says."""
    answer = state.sandbox(ref).set_lifetime(seconds)
    render(state, answer, ["timeout_s", "expires_at", "on_expiry"])


@vm.command(
    "exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.argument("ref")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("-e", "--env", "env_pairs", multiple=True, help="NAME=VALUE (repeatable)")
@click.option("-w", "--cwd", default=None)
@click.option("--timeout", type=float, default=None, help="seconds the command may run")
@click.option("-i", "--stdin", "stdin_file", type=click.File("rb"), help="a file ('-': stdin)")
@pass_state
def vm_exec(
    state: State,
    ref: str,
    argv: tuple[str, ...],
    env_pairs: tuple[str, ...],
    cwd: str | None,
    timeout: float | None,
    stdin_file: Any,
) -> None:
    """Run a command in the guest, streaming its output; exit with its exit code.

    Options go before the VM; everything after it is the command:
    sandbox vm exec -e LANG=C web ls -l /
    """
    env: dict[str, str] = {}
    for pair in env_pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--env wants NAME=VALUE, not {pair!r}")
        env[key] = value
    stdin = stdin_file.read() if stdin_file is not None else None
    sandbox = state.sandbox(ref)
    stream = sandbox.exec_stream(list(argv), stdin=stdin, env=env, cwd=cwd, timeout=timeout)
    out, err = sys.stdout.buffer, sys.stderr.buffer
    for chunk in stream:
        target = out if chunk.stream == "stdout" else err
        target.write(chunk.data)
        target.flush()
    status = stream.status
    assert status is not None
    if status.timed_out:
        click.echo(f"sandbox: the command timed out after {status.duration_s:.1f} s", err=True)
        sys.exit(EXIT_EXEC_TIMED_OUT)
    if status.signal:
        sys.exit(128 + int(status.signal))
    sys.exit(int(status.exit_code or 0))


DETACH = b"\x1d"  # Ctrl-]


@vm.command("console")
@click.argument("ref")
@pass_state
def vm_console(state: State, ref: str) -> None:
    """Attach to the VM's serial console; Ctrl-] detaches.

    The terminal is put in raw mode (keys go to the guest as typed) and restored on exit.
    A viewer (or a read-only token) watches: what it types is dropped.
    """
    sandbox = state.sandbox(ref)
    size = shutil.get_terminal_size()
    stdin_fd, stdout_fd = sys.stdin.fileno(), sys.stdout.fileno()
    interactive = os.isatty(stdin_fd)
    with sandbox.console(cols=size.columns, rows=size.lines) as con:
        saved = termios.tcgetattr(stdin_fd) if interactive else None
        ended = threading.Event()

        def show() -> None:
            try:
                for item in con:
                    if isinstance(item, bytes):
                        os.write(stdout_fd, item)
                    elif item.get("type") == "session":
                        note = f"[console of {item.get('vm')}, {item.get('mode')}; Ctrl-] detaches]"
                        os.write(stdout_fd, (note + "\r\n").encode())
                    elif item.get("type") == "link" and not item.get("connected", True):
                        os.write(stdout_fd, f"[{item.get('reason', 'link down')}]\r\n".encode())
            finally:
                ended.set()

        reader = threading.Thread(target=show, daemon=True)
        try:
            if saved is not None:
                tty.setraw(stdin_fd)
            reader.start()
            while not ended.is_set():
                ready, _, _ = select.select([stdin_fd], [], [], 0.2)
                if not ready:
                    continue
                data = os.read(stdin_fd, 1024)
                if not data:
                    break
                if DETACH in data:
                    head = data.split(DETACH, 1)[0]
                    if head:
                        con.send(head)
                    break
                con.send(data)
        finally:
            if saved is not None:
                termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
    reader.join(timeout=5)
    click.echo("\r\n[detached]", err=True)


@vm.command("cp")
@click.argument("source")
@click.argument("destination")
@pass_state
def vm_cp(state: State, source: str, destination: str) -> None:
    """Copy a file into or out of a VM; the VM's side is VM:/path (SHA-256 checked).

    sandbox vm cp ./data.csv web:/srv/data.csv    sandbox vm cp web:/var/log/app.log .
    """
    src_vm, src_path = _split_remote(source)
    dst_vm, dst_path = _split_remote(destination)
    if (src_vm is None) == (dst_vm is None):
        raise click.UsageError("exactly one side is VM:/path")
    if dst_vm is not None:
        sandbox = state.sandbox(dst_vm)
        stored = sandbox.files.upload(Path(src_path), dst_path)
        click.echo(
            f"{src_path} -> {dst_vm}:{dst_path} ({stored['size']} bytes, {stored['sha256']})"
        )
        return
    assert src_vm is not None
    sandbox = state.sandbox(src_vm)
    local = Path(dst_path)
    if local.is_dir():
        local = local / (Path(src_path).name or "download")
    sandbox.files.download(src_path, local)
    click.echo(f"{src_vm}:{src_path} -> {local} ({local.stat().st_size} bytes)")


def _split_remote(spec: str) -> tuple[str | None, str]:
    head, sep, tail = spec.partition(":")
    if sep and tail.startswith("/") and "/" not in head and head:
        return head, tail
    return None, spec


@vm.command("snapshot")
@click.argument("ref")
@click.option("--name", default=None)
@wait_options
@pass_state
def vm_snapshot(
    state: State, ref: str, name: str | None, no_wait: bool, timeout: float | None
) -> None:
    """Take a snapshot of a running or paused VM."""
    sandbox = state.sandbox(ref)
    answer = state.client.run(
        _core.vm_action(
            sandbox.id, "snapshot", {"name": name} if name else {}, not no_wait, timeout
        )
    )
    render(state, state.client.run(_core.get_snapshot(answer["snapshot"]["id"])), SNAPSHOT_COLUMNS)


@vm.command("restore")
@click.argument("snapshot")
@wait_options
@pass_state
def vm_restore(state: State, snapshot: str, no_wait: bool, timeout: float | None) -> None:
    """Put a snapshot's VM back to the snapshot, in place."""
    answer = state.client.run(_core.restore(state.snapshot_id(snapshot), not no_wait, timeout))
    render(state, answer["vm"], VM_COLUMNS)


@vm.command("clone")
@click.argument("snapshot")
@click.option("--name", default=None, help="the new VM's name")
@wait_options
@pass_state
def vm_clone(
    state: State, snapshot: str, name: str | None, no_wait: bool, timeout: float | None
) -> None:
    """A new VM from a snapshot."""
    answer = state.client.run(_core.clone(state.snapshot_id(snapshot), name, not no_wait, timeout))
    render(state, answer["vm"], VM_COLUMNS)


# --- snapshot ---------------------------------------------------------------------------------


@cli.group(cls=Group)
def snapshot() -> None:
    """Snapshots."""


@snapshot.command("ls")
@click.option("--vm", "vm_ref", default=None, help="only this VM's (id or name)")
@pass_state
def snapshot_ls(state: State, vm_ref: str | None) -> None:
    """List snapshots."""
    vm_id = state.sandbox(vm_ref).id if vm_ref else None
    render(state, state.client.run(_core.list_snapshots(vm_id)), SNAPSHOT_COLUMNS)


# --- audit ------------------------------------------------------------------------------------


@cli.group(cls=Group)
def audit() -> None:
    """Audit exports (needs the export permission: auditors, admins)."""


@audit.command("export")
@click.argument("kind", type=click.Choice(_core.EXPORT_KINDS))
@click.option("--since", required=True, help="ISO 8601 date or date-time (UTC if no offset)")
@click.option("--until", required=True, help="ISO 8601 date or date-time, excluded")
@click.option("--framework", help="a report's: soc2, iso27001, hipaa, pci_dss, gdpr")
@click.option("--format", "fmt", default="json", show_default=True, help="a report's: json|csv|pdf")
@click.option("-O", "--out", "out", type=click.Path(path_type=Path), help="the file to write")
@click.option("--timeout", type=float, default=3600.0, show_default=True)
@pass_state
def audit_export(
    state: State,
    kind: str,
    since: str,
    until: str,
    framework: str | None,
    fmt: str,
    out: Path | None,
    timeout: float,
) -> None:
    """Export a compliance report or an evidence bundle to a file, with a progress bar.

    sandbox audit export report --framework soc2 --format pdf --since 2026-01-01 --until 2026-04-01
    """
    body: dict[str, Any] = {"since": since, "until": until}
    if kind == "report":
        if not framework:
            raise click.UsageError("a report needs --framework")
        body.update(framework=framework, format=fmt)
    job = state.client.run(_core.start_export(kind, body))
    deadline = time.monotonic() + timeout
    with click.progressbar(length=100, label=f"exporting {kind}", file=sys.stderr) as bar:
        shown = 0
        while job["status"] not in ("done", "failed"):
            if time.monotonic() > deadline:
                raise WaitTimeout(f"export {job['id']} still {job['status']} after {timeout:g} s")
            time.sleep(0.5)
            job = state.client.run(_core.export_job(str(job["id"])))
            percent = int(job.get("percent") or 0)
            bar.update(max(0, percent - shown))
            shown = max(shown, percent)
        if job["status"] == "failed":
            raise RequestFailed(f"export {job['id']} failed: {job.get('error') or 'no reason'}")
        bar.update(100 - shown)
    target = out or Path(job.get("file_name") or f"export-{job['id']}")
    state.client.run(_core.download_export(job, target))
    click.echo(f"{target} ({job.get('size')} bytes, sha256 {job.get('sha256')})")


# --- events -----------------------------------------------------------------------------------


@cli.group(cls=Group)
def events() -> None:
    """The audit trail (needs the audit read permission)."""


@events.command("tail")
@click.option("-f", "--follow", is_flag=True, help="keep printing new events")
@click.option(
    "-n",
    "--lines",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="how many past events",
)
@click.option("--type-prefix", default=None, help="e.g. vm.")
@click.option("--vm", "vm_id", default=None, help="one VM's events (its id)")
@click.option("--interval", default=1.0, show_default=True, help="seconds between polls")
@pass_state
def events_tail(
    state: State,
    follow: bool,
    lines: int,
    type_prefix: str | None,
    vm_id: str | None,
    interval: float,
) -> None:
    """The latest events; with --follow, new ones as they are recorded."""
    params: dict[str, Any] = {}
    if type_prefix:
        params["type_prefix"] = type_prefix
    if vm_id:
        params["aggregate_id"] = vm_id
    # The newest position first: the count says where the trail ends.
    page = state.client.run(
        _core.request(_core.Call("GET", "/events/", params={**params, "limit": 1}))
    )
    total = int(page.get("count") or 0)
    wanted = max(lines, 1)  # at least the newest, to know where to follow from
    query = {**params, "limit": wanted, "offset": max(0, total - wanted)}
    rows = state.client.run(_core.request(_core.Call("GET", "/events/", params=query)))["results"]
    after = rows[-1]["position"] if rows else None
    _print_events(state, rows[len(rows) - lines :] if lines > 0 else [], header=True)
    # Each read of the trail is itself an event (audit.trail_read): the follower's own reads are
    # passed over, or it would print its previous poll at every poll.
    own = _token_key(state.client.config.token)
    while follow:
        time.sleep(interval)
        new = state.client.run(_core.events_after(after, params))
        if new:
            after = new[-1]["position"]
            shown = [
                e for e in new if not (e["type"] == "audit.trail_read" and e["token_id"] == own)
            ]
            if shown:
                _print_events(state, shown, header=False)


def _token_key(token: str) -> str | None:
    """The public key of a token ``sbx_<key>_<secret>``, as events name it."""
    parts = token.split("_")
    return parts[1] if len(parts) >= 3 and parts[0] == "sbx" else None


def _print_events(state: State, rows: list[dict[str, Any]], header: bool) -> None:
    if state.output == "table":
        text = table(rows, EVENT_COLUMNS)
        lines = text.splitlines()
        click.echo("\n".join(lines if header else lines[1:]))
    else:  # one JSON (or YAML) document per event, so a follower can read them one by one
        for row in rows:
            if state.output == "json":
                click.echo(json.dumps(row, sort_keys=True, default=str))
            else:
                click.echo("---\n" + yaml.safe_dump(row, sort_keys=True).rstrip())
    sys.stdout.flush()  # a follower reads each event as it comes, even through a pipe


# --- mcp ----------------------------------------------------------------------------------------

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@cli.command("mcp")
@click.option(
    "--transport",
    type=click.Choice(["stdio", "streamable-http"]),
    default="stdio",
    show_default=True,
    help="stdio: one client (the process that started it), with this CLI's token; "
    "streamable-http: an HTTP endpoint where each client sends its own token",
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="streamable-http: address to listen on"
)
@click.option(
    "--port", type=click.IntRange(1, 65535), default=8765, show_default=True, help="streamable-http"
)
@click.option(
    "--path", "http_path", default="/mcp", show_default=True, help="streamable-http: endpoint path"
)
@click.option(
    "--max-output",
    type=click.IntRange(min=1),
    default=None,
    help="bytes of each of an exec's stdout and stderr returned (default 65536)",
)
@click.option(
    "--max-file",
    type=click.IntRange(min=1),
    default=None,
    help="bytes a read_file or write_file moves at most (default 1048576)",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="warning",
    show_default=True,
    help="of what goes to stderr",
)
@pass_state
def mcp(
    state: State,
    transport: str,
    host: str,
    port: int,
    http_path: str,
    max_output: int | None,
    max_file: int | None,
    log_level: str,
) -> None:
    """Serve the sandboxes as MCP tools (docs/mcp.md): list_templates, list_sandboxes,
    create_sandbox, exec, read_file, write_file, snapshot_sandbox, start_sandbox,
    stop_sandbox, destroy_sandbox.

    Every tool call is an API call with the caller's token, refused and audited by the API as
    any other. Over stdio the token is this CLI's (--token, SANDBOX_TOKEN or `sandbox login`);
    over streamable HTTP each client sends its own (Authorization: Bearer <token>), and the
    --token of this command is not used. Tools the token may not use are not listed.

    \b
    sandbox mcp                                   # stdio, for a client that starts it
    sandbox mcp --transport streamable-http --port 8765   # http://127.0.0.1:8765/mcp
    """
    # The MCP server is an optional extra of the SDK: imported only by this command.
    try:
        from sandbox_sdk import mcp_server
    except ImportError as exc:
        raise click.UsageError(
            f"the MCP server needs the mcp extra: pip install 'microvm-sandbox-sdk[mcp]' ({exc})"
        ) from exc
    limits = mcp_server.Limits(
        max_output=max_output or mcp_server.DEFAULT_MAX_OUTPUT,
        max_file=max_file or mcp_server.DEFAULT_MAX_FILE,
    )
    level: Any = log_level.upper()
    if transport == "stdio":
        client = state.client  # the token is checked now: a bad one fails here, not per call
        me = client.run(_core.request(_core.Call("GET", "/me/")))
        click.echo(
            f"sandbox mcp: serving {client.config.url} as {me.get('username')} over stdio",
            err=True,
        )
        server = mcp_server.SandboxMCP(
            client.config.url, client.config.token, limits=limits, log_level=level
        )
        server.run("stdio")
        return
    if not http_path.startswith("/"):
        raise click.UsageError("--path must start with /")
    url = _core.server_url(state.url)
    if state.token:
        click.echo(
            "sandbox mcp: over HTTP each client sends its own token; --token is not used",
            err=True,
        )
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(
            f"sandbox mcp: listening on {host}, beyond this machine: put TLS in front of it "
            "(clients send their API tokens)",
            err=True,
        )
    click.echo(f"sandbox mcp: serving {url} at http://{host}:{port}{http_path}", err=True)
    server = mcp_server.SandboxMCP(url, None, limits=limits, log_level=level)
    server.run("streamable-http", host=host, port=port, streamable_http_path=http_path)


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script: eval "$(sandbox completion bash)"."""
    kind = get_completion_class(shell)
    assert kind is not None
    click.echo(kind(cli, {}, "sandbox", "_SANDBOX_COMPLETE").source())


def main(argv: Sequence[str] | None = None) -> None:
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="sandbox")
    except SandboxError as exc:  # raised outside a group's invoke (e.g. config resolution)
        fail(exc)


__all__ = ["EXIT", "Config", "cli", "main"]
