"""Typed errors from the API's error bodies, the CLI's output formats and exit codes, login,
and retries: against the product served for real (no guest needs to run for these)."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from click.testing import CliRunner
from sandbox_sdk import (
    AuthError,
    BadRequest,
    ChecksumMismatch,
    Client,
    Conflict,
    Forbidden,
    NotFound,
    QuotaExceeded,
    RequestFailed,
    Sandbox,
    Unavailable,
    _core,
)
from sandbox_sdk.cli import cli

pytestmark = pytest.mark.django_db(transaction=True)


def run_cli(*args: str, token: str | None = None, input: str | None = None):
    env = {"SANDBOX_TOKEN": token} if token else {}
    return CliRunner().invoke(cli, list(args), env=env, input=input, catch_exceptions=False)


def test_typed_errors_name_what_refused(sdk_env, make_user, issue_token) -> None:
    from vms.models import Quota

    owner, viewer = make_user("operator", "owner"), make_user("viewer", "watcher")
    client = Client(token=issue_token(owner))
    stopped = Sandbox.create(template="linux-small", name="kept", start=False, client=client)
    assert stopped.state == "stopped" and stopped.name == "kept"

    with pytest.raises(Conflict) as conflict:
        stopped.pause()
    assert conflict.value.status == 409 and conflict.value.state == "stopped"
    assert "running" in conflict.value.allowed_states

    with pytest.raises(NotFound):
        Sandbox.connect(str(uuid.uuid4()), client=client)

    watcher = Client(token=issue_token(viewer))
    seen = Sandbox.connect(stopped.id, client=watcher)  # a viewer sees every VM ...
    with pytest.raises(Forbidden) as forbidden:  # ... and drives none
        seen.start()
    assert forbidden.value.status == 403 and not isinstance(forbidden.value, QuotaExceeded)

    Quota.objects.create(user=owner, max_vms=1)
    with pytest.raises(QuotaExceeded) as quota:
        Sandbox.create(template="linux-small", name="one-too-many", start=False, client=client)
    assert (quota.value.quota, quota.value.limit, quota.value.used) == ("vms", 1, 1)
    assert quota.value.requested == 1

    with pytest.raises(AuthError) as auth:
        Sandbox.list(client=Client(token="sbx_not-a-token"))
    assert auth.value.status == 401
    # Nothing refused above changed anything: the one VM, still stopped.
    assert [(s.name, s.state) for s in Sandbox.list(client=client)] == [("kept", "stopped")]


def test_cli_tables_json_yaml_and_exit_codes(sdk_env, make_user, issue_token) -> None:
    from vms.models import Quota

    owner, viewer = make_user("operator", "owner"), make_user("viewer", "watcher")
    token, viewer_token = issue_token(owner), issue_token(viewer)

    created = run_cli(
        "-o", "json", "vm", "create", "cli-1", "-t", "linux-small", "--no-start", token=token
    )
    assert created.exit_code == 0, created.output
    vm = json.loads(created.stdout)
    assert (vm["name"], vm["state"], vm["template"]) == ("cli-1", "stopped", "linux-small")

    listed = run_cli("vm", "ls", token=token)
    assert listed.exit_code == 0
    header, *rows = listed.stdout.splitlines()
    assert header.split() == [
        "ID",
        "NAME",
        "STATE",
        "TEMPLATE",
        "VCPUS",
        "MEMORY_MIB",
        "IP",
        "CREATED_AT",
    ]
    assert len(rows) == 1 and rows[0].split()[:4] == [vm["id"], "cli-1", "stopped", "linux-small"]

    as_json = json.loads(run_cli("-o", "json", "vm", "ls", token=token).stdout)
    assert [v["id"] for v in as_json] == [vm["id"]]
    as_yaml = yaml.safe_load(run_cli("-o", "yaml", "vm", "show", "cli-1", token=token).stdout)
    assert as_yaml["id"] == vm["id"] and as_yaml["state"] == "stopped"
    shown = run_cli("vm", "show", vm["id"], token=token).stdout
    assert any(line.split() == ["state", "stopped"] for line in shown.splitlines())

    def refused(*args: str, code: int, who: str = token, says: str = "") -> None:
        result = run_cli(*args, token=who)
        assert result.exit_code == code, (args, result.exit_code, result.stdout, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("sandbox: "), result.stderr
        assert says in lines[0], lines[0]
        assert result.stdout == ""

    refused("vm", "show", str(uuid.uuid4()), code=3, says="404")
    refused("vm", "show", "no-such-name", code=3, says="no VM named")
    refused("vm", "start", "cli-1", code=4, who=viewer_token, says="403")
    refused("vm", "pause", "cli-1", code=5, says="state: stopped")
    Quota.objects.create(user=owner, max_vms=1)
    refused("vm", "create", "cli-2", "-t", "linux-small", "--no-start", code=6, says="quota vms")
    refused("vm", "ls", code=8, who="sbx_wrong", says="401")
    # No worker runs in this test: a start stays pending, and the wait gives up.
    Quota.objects.filter(user=owner).update(max_vms=5)
    refused(
        "vm", "create", "cli-3", "-t", "linux-small", "--timeout", "0.5", code=9, says="pending"
    )
    usage = run_cli("vm", "cp", "a", "b", token=token)
    assert usage.exit_code == 2 and "exactly one side" in usage.stderr

    # The installed entry point: the same codes for a script.
    entry = Path(sys.executable).parent / "sandbox"
    done = subprocess.run(
        [str(entry), "vm", "show", str(uuid.uuid4())],
        env={"SANDBOX_URL": sdk_env.url, "SANDBOX_TOKEN": token, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3 and done.stderr.startswith("sandbox: 404"), done.stderr


def test_login_stores_a_checked_token_for_the_owner_only(
    sdk_env, make_user, issue_token, tmp_path
) -> None:
    token = issue_token(make_user("operator", "owner"))
    bad = run_cli("login", "--url", sdk_env.url, "--token", "sbx_wrong")
    assert bad.exit_code == 8 and not _core.config_path().exists()

    good = run_cli("login", "--url", sdk_env.url, input=f"{token}\n")
    assert good.exit_code == 0, good.output
    path = _core.config_path()
    assert path.is_relative_to(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"url": sdk_env.url, "token": token}
    # Later commands use it without SANDBOX_TOKEN.
    listed = CliRunner().invoke(cli, ["-o", "json", "vm", "ls"], env={"SANDBOX_URL": None})
    assert listed.exit_code == 0 and json.loads(listed.stdout) == []


def test_only_idempotent_calls_are_retried_on_503(monkeypatch) -> None:
    monkeypatch.setattr(_core, "backoff", lambda attempt: 0.0)
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        if len(seen) < 3:
            return httpx.Response(503, json={"detail": "busy"})
        return httpx.Response(200, json={"id": "x", "name": "n", "state": "running"})

    client = Client("http://127.0.0.1:9", "t")
    client.http = httpx.Client(
        base_url=client.http.base_url, transport=httpx.MockTransport(handler)
    )
    assert Sandbox.connect("x", client=client).state == "running"
    assert seen == ["GET", "GET", "GET"]

    seen.clear()
    with pytest.raises(Unavailable):  # a POST may have been carried out: never repeated
        client.run(_core.vm_action("x", "pause", None, False, None))
    assert seen == ["POST"]

    def unreachable(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        raise httpx.ConnectError("refused")

    seen.clear()
    client.http = httpx.Client(
        base_url=client.http.base_url, transport=httpx.MockTransport(unreachable)
    )
    with pytest.raises(Unavailable):
        Sandbox.connect("x", client=client)
    assert seen == ["GET"] * (1 + _core.RETRIES)


def test_keep_leaves_the_vm(sdk_env, make_user, issue_token) -> None:
    client = Client(token=issue_token(make_user("operator", "owner")))
    with Sandbox.create(template="linux-small", start=False, keep=True, client=client) as sb:
        vm_id = sb.id
    assert Sandbox.connect(vm_id, client=client).state == "stopped"
    with Sandbox.connect(vm_id, client=client):  # connected to, not made here: kept too
        pass
    assert Sandbox.connect(vm_id, client=client).state == "stopped"


def test_a_digest_other_than_the_servers_is_refused() -> None:
    download = _core.download("vm", "/x", None)
    next(download)
    with pytest.raises(ChecksumMismatch):
        download.send(_core.Reply(200, {"x-content-sha256": "0" * 64}, b"payload"))
    upload = _core.upload("vm", "/x", b"payload", hashlib.sha256(b"payload").hexdigest())
    next(upload)
    with pytest.raises(ChecksumMismatch):
        upload.send(_core.Reply(201, {}, json.dumps({"sha256": "0" * 64}).encode()))


def test_the_sdk_and_cli_import_no_django() -> None:
    """The SDK is installable alone: nothing of it imports Django or the product's apps."""
    code = (
        "import sys, sandbox_sdk, sandbox_sdk.cli, sandbox_sdk.aio;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'django', 'rest_framework', 'channels', 'core', 'audit', 'accounts', 'vms', 'sandbox_site'});"
        "print(bad)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_failed_request_raises_with_its_reason(sdk_env, worker, make_user, issue_token) -> None:
    """The worker's outcome is a failure (no Windows image on this host): RequestFailed with the
    outcome event's reason, and exit code 10 from the CLI."""
    token = issue_token(make_user("admin", "boss"))
    with pytest.raises(RequestFailed) as failed:
        Sandbox.create(template="windows-default", name="win-1", client=Client(token=token))
    assert failed.value.outcome["type"] == "vm.start_failed"
    assert "no Windows image" in str(failed.value)
    result = run_cli("vm", "create", "win-2", "-t", "windows-default", token=token)
    assert result.exit_code == 10, (result.stdout, result.stderr)
    assert result.stderr.startswith("sandbox: vm.start_failed: ") and "Windows" in result.stderr


def test_audit_export_writes_the_checked_file(sdk_env, make_user, issue_token, tmp_path) -> None:
    auditor = issue_token(make_user("auditor", "reader"))
    out = tmp_path / "soc2.json"
    args = ["audit", "export", "report", "--framework", "soc2", "--format", "json"]
    args += ["--since", "2020-01-01", "--until", "2100-01-01", "-O", str(out)]
    result = run_cli(*args, token=auditor)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert result.stdout.strip().endswith(f"sha256 {digest})")
    assert "exporting report" in result.stderr  # the progress bar
    assert json.loads(out.read_bytes())  # the report itself
    operator = issue_token(make_user("operator", "nosy"))
    refused = run_cli(*args, token=operator)
    assert refused.exit_code == 4 and refused.stderr.startswith("sandbox: 403")
    assert run_cli("audit", "export", "report", "--since", "x", "--until", "y").exit_code == 2


def test_shell_completion() -> None:
    script = run_cli("completion", "bash")
    assert script.exit_code == 0 and "_SANDBOX_COMPLETE=bash_complete" in script.stdout
    entry = Path(sys.executable).parent / "sandbox"
    env = {"COMP_WORDS": "sandbox vm ex", "COMP_CWORD": "2", "_SANDBOX_COMPLETE": "bash_complete"}
    done = subprocess.run([str(entry)], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["plain,exec"]


def test_events_tail_and_follow(sdk_env, make_user, issue_token) -> None:
    auditor = issue_token(make_user("auditor", "reader"))
    owner = Client(token=issue_token(make_user("operator", "owner")))
    last = run_cli("-o", "json", "events", "tail", "-n", "3", token=auditor)
    assert last.exit_code == 0, last.stderr
    rows = [json.loads(line) for line in last.stdout.splitlines()]
    positions = [r["position"] for r in rows]
    assert len(rows) == 3 and positions == sorted(positions)
    table_out = run_cli("events", "tail", "-n", "2", token=auditor).stdout.splitlines()
    assert table_out[0].split()[:3] == ["POSITION", "RECORDED_AT", "TYPE"] and len(table_out) == 3

    from audit.models import Event

    def reads() -> int:  # each read of the trail is recorded, under the reader's token
        key = auditor.split("_")[1]
        return Event.objects.filter(type="audit.trail_read", token_id=key).count()

    entry = Path(sys.executable).parent / "sandbox"
    read_before = reads()
    follower = subprocess.Popen(
        [str(entry), "-o", "json", "events", "tail", "-f", "-n", "0", "--interval", "0.2"],
        env={"SANDBOX_URL": sdk_env.url, "SANDBOX_TOKEN": auditor, "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # It has read where the trail ends (two reads) and polled after it once: a fixed pause
        # was too short when a loaded machine took seconds to start the process.
        deadline = time.monotonic() + 60
        while reads() < read_before + 3:
            assert follower.poll() is None, follower.communicate()
            assert time.monotonic() < deadline, "the follower never read the trail"
            time.sleep(0.1)
        made = Sandbox.create(template="linux-small", name="followed", start=False, client=owner)
        assert follower.stdout is not None
        seen: list[dict] = []
        while not any(e["type"] == "vm.created" for e in seen) and len(seen) < 10:
            seen.append(json.loads(follower.stdout.readline()))
        # Only what came after it started (the VM, and the default network its owner's first VM
        # made), never its own reads of the trail.
        assert all(e["position"] > positions[-1] for e in seen)
        assert ("vm.created", made.id) in [(e["type"], e["aggregate_id"]) for e in seen]
        assert "audit.trail_read" not in [e["type"] for e in seen], seen
    finally:
        follower.terminate()
        follower.wait(timeout=10)


def test_lifetimes_from_the_sdk_and_the_cli(sdk_env, make_user, issue_token) -> None:
    """A lifetime given at create (SDK and CLI), set later, cleared, and refused when bad: the
    server's VM says what each asked."""
    from datetime import datetime, timedelta

    from django.utils import timezone

    from vms.models import VirtualMachine

    token = issue_token(make_user("operator", "owner"))
    client = Client(token=token)
    timed = Sandbox.create(
        template="linux-small", name="timed", start=False, lifetime_s=600, client=client
    )
    ends = VirtualMachine.objects.get(pk=timed.id).expires_at
    assert timezone.now() + timedelta(seconds=590) < ends <= timezone.now() + timedelta(seconds=600)
    answer = timed.set_lifetime(60)
    assert answer["timeout_s"] == 60 and answer["on_expiry"] == "stop"
    assert timed.info["expires_at"] == answer["expires_at"]
    assert VirtualMachine.objects.get(pk=timed.id).expires_at == datetime.fromisoformat(
        answer["expires_at"]
    )
    with pytest.raises(BadRequest) as bad:
        timed.set_lifetime(-1)
    assert bad.value.status == 400
    assert VirtualMachine.objects.get(pk=timed.id).expires_at is not None  # unchanged

    made = run_cli(
        "-o", "json", "vm", "create", "cli-timed", "-t", "linux-small", "--no-start",
        "--lifetime", "300", token=token,
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    assert VirtualMachine.objects.get(name="cli-timed").expires_at is not None
    cleared = run_cli("-o", "json", "vm", "lifetime", "cli-timed", "0", token=token)
    assert cleared.exit_code == 0, cleared.output
    assert json.loads(cleared.stdout)["expires_at"] is None
    assert VirtualMachine.objects.get(name="cli-timed").expires_at is None
    refused = run_cli("vm", "lifetime", "cli-timed", "-5", token=token)
    assert refused.exit_code == 2  # a usage error: nothing sent
