"""The guest agent on a real QEMU guest: exec semantics and file transfer."""

from __future__ import annotations

import hashlib
import io
import os
import time

import pytest

from .conftest import Guest

pytestmark = pytest.mark.guest


def test_exec_echo_returns_stdout_and_zero_exit(shared_guest: Guest) -> None:
    result = shared_guest.client.exec(["echo", "hello from the guest"])
    assert result.exit_code == 0
    assert result.stdout == b"hello from the guest\n"
    assert result.stderr == b""


def test_processes_get_no_address_space_randomization_under_tcg_only(
    shared_guest: Guest,
) -> None:
    # rc.sysinit: under TCG a process at the addresses of the last one reuses its translations;
    # under KVM (the guest has kvm-clock) ASLR costs nothing and stays on.
    clocks = shared_guest.client.exec(
        ["cat", "/sys/devices/system/clocksource/clocksource0/available_clocksource"]
    ).stdout.split()
    setting = shared_guest.client.exec(["cat", "/proc/sys/kernel/randomize_va_space"]).stdout
    maps = [
        shared_guest.client.exec(["grep", "-m1", "libc", "/proc/self/maps"]).stdout
        for _ in range(2)
    ]
    assert maps[0] and maps[1]
    if b"kvm-clock" in clocks:
        assert setting == b"2\n" and maps[0] != maps[1]
    else:
        assert setting == b"0\n" and maps[0] == maps[1]


def test_exec_keeps_stderr_apart_from_stdout(shared_guest: Guest) -> None:
    result = shared_guest.client.exec(["sh", "-c", "echo out; echo err >&2"])
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"


def test_exec_reports_non_zero_exit(shared_guest: Guest) -> None:
    result = shared_guest.client.exec(["sh", "-c", "exit 42"])
    assert result.exit_code == 42
    assert not result.ok


def test_exec_feeds_stdin(shared_guest: Guest) -> None:
    result = shared_guest.client.exec(["sha256sum"], stdin=b"abc" * 1000)
    assert result.exit_code == 0
    assert result.stdout.split()[0].decode() == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_exec_timeout_kills_the_process(shared_guest: Guest) -> None:
    started = time.monotonic()
    result = shared_guest.client.exec(["sleep", "1000"], timeout=1.0)
    assert result.timed_out
    assert result.exit_code != 0
    assert time.monotonic() - started < 20
    # Nothing is left running in the guest.
    left = shared_guest.client.exec(["sh", "-c", "ps -eo args | grep -c '^sleep 1000' || true"])
    assert left.stdout.strip() == b"0"


def test_upload_and_download_10_mb_keep_their_sha256(shared_guest: Guest, tmp_path) -> None:  # noqa: ANN001
    data = os.urandom(10 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    up = shared_guest.client.put_file(data, "/tmp/blob.bin", timeout=120)
    assert up.size == len(data) and up.sha256 == digest
    inside = shared_guest.client.exec(["sha256sum", "/tmp/blob.bin"])
    assert inside.stdout.split()[0].decode() == digest
    down = shared_guest.client.get_host_file(
        "/tmp/blob.bin", tmp_path / "blob.bin", within=tmp_path, timeout=120
    )
    assert down.sha256 == digest
    assert hashlib.sha256((tmp_path / "blob.bin").read_bytes()).hexdigest() == digest
    shared_guest.client.exec(["rm", "/tmp/blob.bin"])


def test_a_failed_upload_leaves_the_channel_usable_at_once(start_guest) -> None:  # noqa: ANN001
    """An upload into a full file system fails with no_space; the bytes already on their way
    must not spoil what comes next: the same client, and the next sessions (the API opens one
    per request), answer at once."""
    from vms.agent.client import AgentError

    guest = start_guest("nospace")
    try:
        setup = guest.client.exec(
            ["sh", "-c", "mkdir -p /tmp/small && mount -t tmpfs -o size=1m tmpfs /tmp/small"]
        )
        assert setup.exit_code == 0, setup.stderr
        with pytest.raises(AgentError) as failed:
            guest.client.put_file(os.urandom(24 << 20), "/tmp/small/big", timeout=120)
        assert failed.value.code == "no_space"
        for attempt in range(3):
            started = time.monotonic()
            client = guest.reconnect(timeout=5.0)
            result = client.exec(["echo", f"next {attempt}"], timeout=10)
            assert result.stdout == f"next {attempt}\n".encode(), result
            assert time.monotonic() - started < 5
        left = guest.client.exec(["sh", "-c", "ls -a /tmp/small | wc -l"])
        assert left.stdout.strip() == b"2"  # . and ..: the partial file was removed

        # An upload the host gives up on (its source fails mid-way) leaves the stream clean too.
        class Failing(io.RawIOBase):
            sent = 0

            def readable(self) -> bool:
                return True

            def readinto(self, buffer) -> int:  # noqa: ANN001
                if self.sent >= 8 << 20:
                    raise OSError("the source went away")
                buffer[:] = b"z" * len(buffer)
                self.sent += len(buffer)
                return len(buffer)

        with pytest.raises(OSError, match="went away"):
            guest.client.put_file(io.BufferedReader(Failing()), "/tmp/cut.bin", timeout=120)
        started = time.monotonic()
        client = guest.reconnect(timeout=5.0)
        assert client.exec(["echo", "after the cut"], timeout=10).stdout == b"after the cut\n"
        assert time.monotonic() - started < 5
        assert client.exec(["sh", "-c", "ls -a /tmp | grep -c cut.bin"]).stdout.strip() == b"0"
        # And on one connection: a failed upload, then at once an exec.
        with pytest.raises(AgentError):
            guest.client.put_file(os.urandom(24 << 20), "/tmp/small/big", timeout=120)
        started = time.monotonic()
        assert guest.client.exec(["echo", "same"], timeout=10).stdout == b"same\n"
        assert time.monotonic() - started < 5
    finally:
        guest.close()
