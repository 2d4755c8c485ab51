"""The SDK and the CLI on real QEMU guests, through the served product and a real worker: one
VM in a context manager for the sync SDK, the async SDK and the CLI (guest boots are few), then
snapshot, restore, clone, and destroy on exit."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sandbox_sdk import (
    AsyncClient,
    AsyncSandbox,
    Client,
    Conflict,
    NotFound,
    Sandbox,
    _core,
)
from sandbox_sdk.cli import cli

pytestmark = [pytest.mark.guest, pytest.mark.django_db(transaction=True)]

# Prints a line, waits, prints the next: streamed output arrives while the command still runs.
TICKS = "for i in 1 2 3; do echo tick $i; sleep 0.4; done; echo done >&2; exit 7"


def test_a_sandbox_from_create_to_destroy_on_exit(
    sdk_env, worker, make_user, issue_token, tmp_path
) -> None:
    token = issue_token(make_user("operator", "owner"))
    client = Client(token=token)

    with Sandbox.create(template="linux-small", name="sdk-1", timeout=240, client=client) as sb:
        assert sb.state == "running" and sb.name == "sdk-1"
        vm_id = sb.id

        result = sb.exec(
            ["sh", "-c", 'read x; echo "$x $GREETING $(pwd)"; echo warn >&2; exit 3'],
            stdin="hello\n",
            env={"GREETING": "world"},
            cwd="/tmp",
            timeout=30,
        )
        assert (result.exit_code, result.stdout, result.stderr) == (
            3,
            "hello world /tmp\n",
            "warn\n",
        )
        assert sb.exec("hostname").stdout == "sdk-1\n"

        # Streamed: chunks as they come, the first long before the command ends.
        stream = sb.exec_stream(["sh", "-c", TICKS], timeout=30)
        began = time.monotonic()
        arrivals: list[tuple[float, str, str]] = []
        for chunk in stream:
            arrivals.append((time.monotonic() - began, chunk.stream, chunk.text))
        out = "".join(text for _, s, text in arrivals if s == "stdout")
        err = "".join(text for _, s, text in arrivals if s == "stderr")
        assert out == "tick 1\ntick 2\ntick 3\n" and err == "done\n"
        assert stream.exit_code == 7
        assert arrivals[0][0] < arrivals[-1][0] - 0.5, arrivals  # not all at the end

        # Files, SHA-256 checked both ways (bytes and files on disk).
        payload = os.urandom(2 * 1024 * 1024 + 17)
        stored = sb.files.write("/data/blob.bin", payload)
        assert stored["sha256"] == hashlib.sha256(payload).hexdigest()
        assert sb.files.read("/data/blob.bin") == payload
        local = tmp_path / "up.txt"
        local.write_bytes(b"line\n" * 1000)
        sb.files.upload(local, "/data/up.txt")
        back = sb.files.download("/data/up.txt", tmp_path / "down.txt")
        assert back.read_bytes() == local.read_bytes()
        check = sb.exec(["sha256sum", "/data/blob.bin"]).stdout.split()[0]
        assert check == hashlib.sha256(payload).hexdigest()
        with pytest.raises(NotFound):
            sb.files.read("/data/none-such")

        # The async SDK, on the same VM: the same operations over asyncio.
        async def from_asyncio() -> tuple[str, int | None, str, bytes, bytes]:
            async with AsyncClient(token=token) as aclient:
                asb = await AsyncSandbox.connect(vm_id, client=aclient)
                ran = await asb.exec(["cat", "/data/up.txt"])
                astream = asb.exec_stream(["sh", "-c", "echo one; sleep 0.2; echo two"])
                chunks = [c.text async for c in astream]
                await asb.files.write("/data/async.txt", "from asyncio\n")
                screen = b""
                async with asb.console() as con:
                    first = await con.recv(timeout=30)
                    assert isinstance(first, dict) and first["type"] == "session"
                    for typed, marker in ((b"\r", b"# "), (b"echo aio$((6*7))\r", b"aio42")):
                        await con.send(typed)
                        deadline = time.monotonic() + 30
                        while marker not in screen and time.monotonic() < deadline:
                            with contextlib.suppress(TimeoutError):
                                frame = await con.recv(timeout=1)
                                screen += frame if isinstance(frame, bytes) else b""
                return (
                    ran.stdout,
                    astream.exit_code,
                    "".join(chunks),
                    await asb.files.read("/data/async.txt"),
                    screen,
                )

        ran_out, aexit, achunks, aread, ascreen = asyncio.run(from_asyncio())
        assert ran_out == "line\n" * 1000 and aexit == 0 and achunks == "one\ntwo\n"
        assert aread == b"from asyncio\n" and b"aio42" in ascreen

        # The CLI on the same VM: streamed output, the guest's exit code passed through.
        env = {"SANDBOX_TOKEN": token}
        runner = CliRunner()
        ran = runner.invoke(cli, ["vm", "exec", "sdk-1", "sh", "-c", TICKS], env=env)
        assert ran.exit_code == 7, ran.output
        assert ran.stdout == "tick 1\ntick 2\ntick 3\n" and ran.stderr == "done\n"
        ok = runner.invoke(cli, ["vm", "exec", "-e", "X=1", vm_id, "sh", "-c", "echo $X"], env=env)
        assert (ok.exit_code, ok.stdout) == (0, "1\n")
        copied = runner.invoke(cli, ["vm", "cp", "sdk-1:/data/blob.bin", str(tmp_path)], env=env)
        assert copied.exit_code == 0, copied.output
        assert (tmp_path / "blob.bin").read_bytes() == payload

        # The serial console: from the SDK, then `sandbox vm console` driven through a pty.
        with sb.console(cols=100, rows=30) as con:
            first = con.recv(timeout=30)
            assert isinstance(first, dict) and first["type"] == "session"
            assert first["mode"] == "write"
            screen = b""

            def until(marker: bytes) -> None:
                nonlocal screen
                deadline = time.monotonic() + 30
                while marker not in screen and time.monotonic() < deadline:
                    with contextlib.suppress(TimeoutError):
                        frame = con.recv(timeout=1)
                        screen += frame if isinstance(frame, bytes) else b""

            con.send(b"\r")  # a fresh prompt once the console is attached
            until(b"# ")
            con.send(b"echo sdk$((6*7))\r")
            until(b"sdk42")
            assert b"sdk42" in screen, screen[-500:]
        typed = console_through_a_pty(
            ["vm", "console", "sdk-1"], token, b"echo cli$((6*7))\r", b"cli42"
        )
        assert b"Ctrl-] detaches" in typed

        # Pause and resume; a second pause is a conflict naming the state.
        sb.pause()
        assert sb.state == "paused", sb.info
        with pytest.raises(Conflict) as conflict:
            sb.pause()
        assert conflict.value.state == "paused"
        paused = runner.invoke(cli, ["vm", "pause", "sdk-1"], env=env)
        assert paused.exit_code == 5 and "state: paused" in paused.stderr
        sb.resume()
        assert sb.state == "running", sb.info

        # Snapshot, change the guest, restore: the change is gone, the snapshot's file is back.
        snap = sb.snapshot("before")
        assert snap.state == "ready" and snap.vm_id == vm_id
        sb.exec(["sh", "-c", "rm /data/blob.bin; echo after > /data/after.txt"])
        listed = runner.invoke(cli, ["-o", "json", "snapshot", "ls", "--vm", "sdk-1"], env=env)
        assert [s["id"] for s in json.loads(listed.stdout)] == [snap.id]
        sb.restore(snap)
        assert sb.state == "running"
        after = sb.exec(["sh", "-c", "ls /data; sha256sum /data/blob.bin"])
        assert "after.txt" not in after.stdout
        assert hashlib.sha256(payload).hexdigest() in after.stdout

        # A clone of the snapshot, destroyed on the exit of its own block.
        with sb.clone(snap, name="sdk-clone", timeout=240) as copy:
            assert copy.state == "running" and copy.id != vm_id
            assert copy.exec("hostname").stdout == "sdk-clone\n"
            assert copy.files.read("/data/async.txt") == b"from asyncio\n"
        assert Sandbox.connect(copy.id, client=client).state == "destroyed"

    # Destroyed on exit of the block.
    assert Sandbox.connect(vm_id, client=client).state == "destroyed"
    kinds = [e["type"] for e in client.run(_core.list_all(f"/vms/{vm_id}/events/"))]
    for step in ("vm.exec_completed", "vm.file_uploaded", "vm.snapshotted", "vm.restored"):
        assert step in kinds
    assert [k for k in kinds if k.startswith("vm.")][-1] == "vm.destroyed"


def console_through_a_pty(args: list[str], token: str, typed: bytes, expect: bytes) -> bytes:
    """Run the installed ``sandbox`` on a pseudo-terminal, type once the session is announced,
    read until ``expect`` appears, detach with Ctrl-]: the process must exit 0."""
    entry = Path(sys.executable).parent / "sandbox"
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [str(entry), *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "SANDBOX_TOKEN": token},
        start_new_session=True,
    )
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, timeout: float) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen:
            assert time.monotonic() < deadline, (marker, seen[-800:])
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:  # the other side closed
                    break
        assert marker in seen, (marker, seen[-800:])

    try:
        read_until(b"Ctrl-] detaches", 30)
        os.write(master, b"\r")  # a fresh prompt once the console is attached
        read_until(b"# ", 30)
        os.write(master, typed)
        read_until(expect, 30)
        os.write(master, b"\x1d")
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)
    return seen


def test_fork_and_idle_from_the_sdk_and_the_cli(sdk_env, worker, make_user, issue_token) -> None:
    """A fork of 2 from the SDK: each new VM holds what the source had in its tmpfs, under a
    host name of its own; the idle policy set and cleared from the SDK and the CLI."""
    from vms.models import VirtualMachine

    token = issue_token(make_user("operator", "owner"))
    client = Client(token=token)
    with Sandbox.create(template="linux-small", name="src", timeout=240, client=client) as src:
        src.exec(["sh", "-c", "echo forked > /tmp/mark"])
        made = src.fork(2, timeout=240)
        try:
            assert [m.state for m in made] == ["running", "running"]
            assert {m.name for m in made} == {"src-fork-1", "src-fork-2"}
            for m in made:
                assert m.exec(["cat", "/tmp/mark"]).stdout == "forked\n"
                assert m.exec("hostname").stdout == f"{m.name}\n"
        finally:
            for m in made:
                m.destroy()

        answer = src.set_idle(300)
        assert answer["idle_timeout_s"] == 300
        assert VirtualMachine.objects.get(pk=src.id).idle_timeout_s == 300
        env = {"SANDBOX_TOKEN": token}
        answer = src.set_idle(300, to_disk=True)
        assert (answer["idle_timeout_s"], answer["idle_to_disk"]) == (300, True)
        assert VirtualMachine.objects.get(pk=src.id).idle_to_disk is True
        args = ["-o", "json", "vm", "idle", "src", "120", "--to-disk"]
        on_disk = CliRunner().invoke(cli, args, env=env)
        assert on_disk.exit_code == 0, on_disk.output
        assert json.loads(on_disk.stdout)["idle_to_disk"] is True
        bad = CliRunner().invoke(cli, ["vm", "idle", "src", "off", "--to-disk"], env=env)
        assert bad.exit_code == 2
        assert VirtualMachine.objects.get(pk=src.id).idle_timeout_s == 120
        cleared = CliRunner().invoke(cli, ["-o", "json", "vm", "idle", "src", "off"], env=env)
        assert cleared.exit_code == 0, cleared.output
        assert json.loads(cleared.stdout)["idle_timeout_s"] is None
        assert VirtualMachine.objects.get(pk=src.id).idle_timeout_s is None
        bad = CliRunner().invoke(cli, ["vm", "idle", "src", "soon"], env=env)
        assert bad.exit_code == 2 and VirtualMachine.objects.get(pk=src.id).idle_timeout_s is None
