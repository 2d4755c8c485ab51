"""The guest agent, run for real on this host, spoken to through vms.agent.client."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vms.agent.client import (
    AgentClient,
    AgentDisconnected,
    AgentError,
    AgentTimeout,
    encode_frame,
)

from .conftest import AGENT, CREDENTIAL, RunningAgent, authed, start_agent, stop_agent


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie still answers kill(0): it is dead all the same
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
                return True
        except (OSError, IndexError):
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------- handshake


def test_hello_reports_protocol_version_and_capabilities(client: AgentClient) -> None:
    hello = client.hello(timeout=5)
    assert hello.protocol == 2
    assert hello.agent_version
    ops = ("exec", "put", "get", "list", "stat", "health", "configure", "network", "ping")
    for op in (*ops, "shutdown"):
        assert op in hello.capabilities
    assert hello.max_frame == 1 << 20


def test_hello_retries_until_the_agent_listens(short_dir: str) -> None:
    path = f"{short_dir}/agent.sock"

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return sock

    started: list[RunningAgent] = []
    timer = threading.Timer(0.5, lambda: started.append(start_agent(short_dir)))
    timer.start()
    try:
        with AgentClient(connect, credential=CREDENTIAL) as client:
            assert client.hello(timeout=15).protocol == 2
    finally:
        timer.join()
        for running in started:
            stop_agent(running)


def test_hello_with_no_common_protocol_is_refused(raw) -> None:
    conn = raw()
    conn.send(authed({"op": "hello", "id": 1, "protocol": [99]}))
    header, _ = conn.frame()
    assert header["kind"] == "error" and header["code"] == "unsupported_version"


def test_hello_times_out_when_nothing_answers() -> None:
    left, right = socket.socketpair()
    try:
        with AgentClient(left, credential=CREDENTIAL) as client, pytest.raises(AgentTimeout):
            client.hello(timeout=0.5)
    finally:
        right.close()


def test_ping_round_trip_is_well_under_a_millisecond(client: AgentClient) -> None:
    for _ in range(50):
        client.ping()
    samples = [client.ping() for _ in range(500)]
    assert statistics.median(samples) < 0.001


# --------------------------------------------------------------------------- exec


def test_exec_returns_stdout_and_exit_code(client: AgentClient) -> None:
    result = client.exec(["echo", "hello guest"])
    assert result.exit_code == 0 and result.ok
    assert result.stdout == b"hello guest\n"
    assert result.stderr == b""
    assert not result.timed_out
    assert 0 < result.duration_s < 5


def test_exec_separates_stderr(client: AgentClient) -> None:
    result = client.exec(["sh", "-c", "echo out; echo err >&2"])
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"


def test_exec_reports_a_non_zero_exit(client: AgentClient) -> None:
    result = client.exec(["sh", "-c", "exit 42"])
    assert result.exit_code == 42
    assert not result.ok


def test_exec_reports_death_by_signal(client: AgentClient) -> None:
    result = client.exec(["sh", "-c", "kill -TERM $$"])
    assert result.exit_code is None
    assert result.signal == signal.SIGTERM


def test_exec_passes_stdin_bytes(client: AgentClient) -> None:
    assert client.exec(["cat"], stdin=b"some input").stdout == b"some input"


def test_exec_streams_large_stdin(client: AgentClient) -> None:
    data = os.urandom(3 << 20)
    result = client.exec(["sha256sum"], stdin=data)
    assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_exec_streams_stdin_from_a_file_object(client: AgentClient) -> None:
    result = client.exec(["wc", "-c"], stdin=io.BytesIO(b"x" * 100_000))
    assert result.stdout.strip() == b"100000"


def test_exec_without_stdin_sees_end_of_file(client: AgentClient) -> None:
    assert client.exec(["cat"], timeout=5).stdout == b""


def test_exec_sets_environment_variables(client: AgentClient) -> None:
    result = client.exec(["sh", "-c", 'echo "$GREETING"'], env={"GREETING": "bonjour"})
    assert result.stdout == b"bonjour\n"


def test_exec_can_start_from_an_empty_environment(client: AgentClient) -> None:
    result = client.exec(["/usr/bin/env"], env={"ONLY": "1"}, clear_env=True)
    lines = set(result.stdout.decode().split())
    assert "ONLY=1" in lines
    assert not any(line.startswith("HOME=") for line in lines)


def test_exec_runs_in_the_given_directory(client: AgentClient, tmp_path: Path) -> None:
    assert client.exec(["pwd"], cwd=str(tmp_path)).stdout.decode().strip() == str(tmp_path)


def test_exec_of_a_missing_program_is_an_error(client: AgentClient) -> None:
    with pytest.raises(AgentError) as info:
        client.exec(["/nonexistent/program"])
    assert info.value.code == "exec_failed"


def test_exec_streams_output_before_the_process_ends(client: AgentClient) -> None:
    arrivals: list[tuple[float, bytes]] = []
    started = time.monotonic()
    result = client.exec(
        ["sh", "-c", "echo first; sleep 1; echo second"],
        on_stdout=lambda chunk: arrivals.append((time.monotonic() - started, chunk)),
    )
    assert result.stdout == b"first\nsecond\n"
    assert arrivals[0][1] == b"first\n"
    assert arrivals[0][0] < 0.8  # seen well before the process finished


def test_exec_timeout_kills_the_whole_process_tree(client: AgentClient, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    started = time.monotonic()
    result = client.exec(["sh", "-c", f"sleep 1000 & echo $! > {pidfile}; sleep 1000"], timeout=1)
    elapsed = time.monotonic() - started
    assert result.timed_out
    assert result.signal == signal.SIGKILL
    assert 0.9 < result.duration_s < 5
    assert elapsed < 5
    assert _gone(int(pidfile.read_text()))


def test_exec_timeout_kills_a_process_that_closed_its_output(client: AgentClient) -> None:
    # Its pipes are at EOF at once: the deadline is kept by the wait for its exit (a pidfd).
    result = client.exec(["sh", "-c", "exec >/dev/null 2>&1; sleep 1000"], timeout=1)
    assert result.timed_out
    assert result.signal == signal.SIGKILL
    assert 0.9 < result.duration_s < 5


def test_the_wait_for_an_exit_wakes_at_the_exit_not_at_a_poll(agent_module) -> None:  # noqa: ANN001
    # Popen.wait(timeout) polls with sleeps growing to 50 ms: a process ending 70 ms in was
    # reaped about 40 ms late. Asleep on its pidfd, the wait returns at the exit.
    lags = []
    for _ in range(5):
        started = time.monotonic()
        proc = subprocess.Popen(["sleep", "0.07"])
        agent_module._wait_exit(proc, 10.0)
        lags.append(time.monotonic() - started - 0.07)
        assert proc.returncode == 0
    assert statistics.median(lags) < 0.02
    proc = subprocess.Popen(["sleep", "1000"])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            agent_module._wait_exit(proc, 0.2)
    finally:
        proc.kill()
        proc.wait()


def test_a_client_side_wait_timeout_raises_and_kills_the_process(
    client: AgentClient, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    with pytest.raises(AgentTimeout):
        client.exec(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 1000"], wait_timeout=1)
    assert _gone(int(pidfile.read_text()))


def test_concurrent_execs_are_multiplexed_over_one_connection(client: AgentClient) -> None:
    results: dict[int, bytes] = {}

    def run(i: int) -> None:
        results[i] = client.exec(["sh", "-c", f"sleep 1; echo {i}"]).stdout

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert time.monotonic() - started < 4  # in parallel, not one after another
    assert results == {i: f"{i}\n".encode() for i in range(8)}


def test_closing_the_connection_kills_its_running_processes(
    agent: RunningAgent, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    client = AgentClient(agent.connect, credential=CREDENTIAL)
    client.hello(timeout=5)
    runner = threading.Thread(
        target=lambda: pytest.raises(
            AgentDisconnected,
            client.exec,
            ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 1000"],
            timeout=None,
        )
    )
    runner.start()
    deadline = time.monotonic() + 5
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    client.close()
    runner.join(timeout=10)
    assert _gone(int(pidfile.read_text()))


def test_signal_reaches_a_running_exec(client: AgentClient, raw) -> None:
    conn = raw()
    conn.send(authed({"op": "exec", "id": "long", "argv": ["sleep", "1000"]}))
    time.sleep(0.2)
    conn.send(authed({"op": "signal", "id": 2, "target": "long", "signal": 15}))
    frames = {}
    while len(frames) < 2:
        header, _ = conn.frame()
        frames[header["id"]] = header
    assert frames[2]["kind"] == "result"
    assert frames["long"]["kind"] == "exit" and frames["long"]["signal"] == 15


# --------------------------------------------------------------------------- files


def test_put_and_get_ten_megabytes_with_matching_sha256(
    client: AgentClient, tmp_path: Path
) -> None:
    data = os.urandom(10 << 20)
    digest = hashlib.sha256(data).hexdigest()
    remote = tmp_path / "remote.bin"
    put = client.put_file(data, str(remote), mode=0o600)
    assert (put.size, put.sha256) == (len(data), digest)
    assert remote.read_bytes() == data
    assert remote.stat().st_mode & 0o777 == 0o600
    local = tmp_path / "back.bin"
    got = client.get_host_file(str(remote), local, within=tmp_path)
    assert (got.size, got.sha256) == (len(data), digest)
    assert hashlib.sha256(local.read_bytes()).hexdigest() == digest


def test_put_from_a_local_path_and_read_back_bytes(client: AgentClient, tmp_path: Path) -> None:
    src = tmp_path / "src.txt"
    src.write_bytes(b"from a path")
    client.put_host_file(src, str(tmp_path / "dst.txt"), within=tmp_path)
    assert client.read_file(str(tmp_path / "dst.txt")) == b"from a path"


def test_put_of_an_empty_file(client: AgentClient, tmp_path: Path) -> None:
    client.put_file(b"", str(tmp_path / "empty"))
    assert (tmp_path / "empty").read_bytes() == b""


def test_put_with_a_wrong_checksum_is_refused_and_leaves_nothing(
    client: AgentClient, tmp_path: Path
) -> None:
    target = tmp_path / "sub"
    target.mkdir()
    with pytest.raises(AgentError) as info:
        client.put_file(os.urandom(600_000), str(target / "f.bin"), expected_sha256="0" * 64)
    assert info.value.code == "checksum_mismatch"
    assert list(target.iterdir()) == []  # neither the file nor its temporary


def test_put_does_not_replace_the_old_file_when_refused(
    client: AgentClient, tmp_path: Path
) -> None:
    target = tmp_path / "keep.txt"
    target.write_bytes(b"original")
    with pytest.raises(AgentError):
        client.put_file(b"new", str(target), expected_sha256="f" * 64)
    assert target.read_bytes() == b"original"


def test_put_into_a_missing_directory(client: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(AgentError) as info:
        client.put_file(b"x", str(tmp_path / "no" / "such" / "f"))
    assert info.value.code == "not_found"
    client.put_file(b"x", str(tmp_path / "no" / "such" / "f"), mkdirs=True)
    assert (tmp_path / "no" / "such" / "f").read_bytes() == b"x"


def test_get_of_a_missing_file_is_not_found(client: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(AgentError) as info:
        client.read_file(str(tmp_path / "missing"))
    assert info.value.code == "not_found"
    assert not (tmp_path / "local").exists()


def test_paths_must_be_absolute(client: AgentClient) -> None:
    with pytest.raises(AgentError) as info:
        client.stat("relative/path")
    assert info.value.code == "bad_request"


def test_transfers_and_execs_run_at_the_same_time(client: AgentClient, tmp_path: Path) -> None:
    data = os.urandom(4 << 20)
    errors: list[BaseException] = []

    def upload(i: int) -> None:
        try:
            client.put_file(data, str(tmp_path / f"f{i}"))
            assert client.read_file(str(tmp_path / f"f{i}")) == data
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    assert client.exec(["echo", "meanwhile"]).stdout == b"meanwhile\n"
    for t in threads:
        t.join(timeout=60)
    assert errors == []


def test_list_returns_entries_with_types(client: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"12345")
    (tmp_path / "d").mkdir()
    (tmp_path / "l").symlink_to("a.txt")
    entries = {e.name: e for e in client.list(str(tmp_path))}
    assert set(entries) == {"a.txt", "d", "l"}
    assert (entries["a.txt"].type, entries["a.txt"].size) == ("file", 5)
    assert entries["d"].type == "dir"
    assert entries["l"].type == "symlink"


def test_list_of_a_large_directory_arrives_in_batches(client: AgentClient, tmp_path: Path) -> None:
    for i in range(1234):
        (tmp_path / f"f{i:04d}").touch()
    assert len(client.list(str(tmp_path))) == 1234


def test_stat_of_files_directories_and_symlinks(client: AgentClient, tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    f.chmod(0o640)
    (tmp_path / "link").symlink_to("f")
    st = client.stat(str(f))
    assert (st.type, st.size, st.mode) == ("file", 3, 0o640)
    assert abs(st.mtime - f.stat().st_mtime) < 1e-3
    assert client.stat(str(tmp_path)).type == "dir"
    link = client.stat(str(tmp_path / "link"), follow_symlinks=False)
    assert (link.type, link.target) == ("symlink", "f")
    with pytest.raises(AgentError) as info:
        client.stat(str(tmp_path / "nope"))
    assert info.value.code == "not_found"


# --------------------------------------------------------------------------- system


def test_health_reports_uptime_load_and_memory(client: AgentClient) -> None:
    health = client.health()
    assert health["uptime_s"] > 0
    assert len(health["load"]) == 3
    assert 0 < health["memory_kib"]["available"] <= health["memory_kib"]["total"]
    assert health["agent_version"] == client.hello_info.agent_version


def test_configure_off_a_guest_only_plans_the_changes(client: AgentClient) -> None:
    result = client.configure(
        time=1_700_000_000.5,
        hostname="clone-1",
        mac="52:54:00:12:34:56",
        address="10.250.0.7/24",
        gateway="10.250.0.1",
        dns=["10.250.0.1"],
    )
    assert result["dry_run"] is True and result["applied"] == []
    assert "ip addr replace 10.250.0.7/24 dev eth0" in result["planned"]
    assert "ip link set dev eth0 address 52:54:00:12:34:56" in result["planned"]
    assert "ip route replace default via 10.250.0.1 dev eth0" in result["planned"]
    assert "hostname clone-1" in result["planned"]


@pytest.mark.parametrize(
    "fields",
    [
        {"hostname": "bad host"},
        {"address": "10.0.0.300/24"},
        {"mac": "52:54:00"},
        {"gateway": "nowhere"},
        {"reseed": False},  # nothing to configure
    ],
)
def test_configure_rejects_invalid_identity(client: AgentClient, fields: dict) -> None:
    with pytest.raises(AgentError) as info:
        client.configure(**fields)
    assert info.value.code == "bad_request"


@pytest.mark.parametrize("entropy", ["not base64!", "c2hvcnQ=", 42, "A" * 1024])
def test_configure_refuses_bad_entropy(client: AgentClient, entropy: object) -> None:
    with pytest.raises(AgentError) as info:
        client._request({"op": "configure", "entropy": entropy, "hostname": "fine"})
    assert info.value.code == "bad_request"


def test_configure_reseeds_first_and_never_echoes_the_bytes(client: AgentClient) -> None:
    """The host's entropy is planned before anything else (a restored guest draws nothing
    before it is reseeded), and the plan names its size only."""
    result = client.configure(hostname="clone-2")
    assert result["planned"][0] == "entropy 32 bytes, crng reseeded"
    assert "hostname clone-2" in result["planned"]
    assert all("=" not in line for line in result["planned"])


def test_shutdown_off_a_guest_ends_the_agent(short_dir: str) -> None:
    running = start_agent(short_dir)
    try:
        with AgentClient(running.connect, credential=CREDENTIAL) as client:
            client.hello(timeout=5)
            client.shutdown("poweroff")
        assert running.proc.wait(timeout=5) == 0
    finally:
        stop_agent(running)


def test_stdio_transport_and_enrolment_on_first_use(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", str(AGENT), "--stdio"],
        stdin=theirs,
        stdout=theirs,
        stderr=subprocess.DEVNULL,
    )
    theirs.close()
    try:
        with AgentClient(ours) as client:
            with pytest.raises(AgentError) as refused:
                client.hello(timeout=10)  # a fresh agent: nothing but enroll
            assert refused.value.code == "not_enrolled"
            client.enroll(CREDENTIAL)
            client.hello(timeout=10)
            assert client.exec(["echo", "over stdio"]).stdout == b"over stdio\n"
    finally:
        proc.terminate()
        proc.wait(timeout=5)


# --------------------------------------------------------------------------- bad input


def test_garbage_gets_an_error_and_the_agent_keeps_serving(raw, agent: RunningAgent) -> None:
    conn = raw()
    conn.send(b"this is not a frame at all")
    header, _ = conn.frame()
    assert (header["kind"], header["code"]) == ("error", "bad_frame")
    conn.send(authed({"op": "ping", "id": 7}))
    assert conn.frame()[0] == {"id": 7, "kind": "pong"}
    assert agent.alive()


def test_a_header_that_is_not_json_is_answered_with_an_error(raw) -> None:
    conn = raw()
    head = b"{not json"
    conn.send(b"\x7fSBA" + len(head).to_bytes(4, "big") + (0).to_bytes(4, "big") + head)
    assert conn.frame()[0]["code"] == "bad_frame"
    conn.send(authed({"op": "ping", "id": 1}))
    assert conn.frame()[0]["kind"] == "pong"


def test_an_oversized_frame_is_refused_by_id_and_skipped(raw, agent: RunningAgent) -> None:
    conn = raw()
    head = b'{"op":"put","id":99}'
    payload = b"\x7fSBA" * (600 << 10)  # 2.4 MiB, full of fake magics to tempt a resync
    conn.send(b"\x7fSBA" + len(head).to_bytes(4, "big") + len(payload).to_bytes(4, "big"))
    conn.send(head + payload)
    header, _ = conn.frame()
    assert (header["id"], header["code"]) == (99, "frame_too_large")
    conn.send(authed({"op": "ping", "id": 100}))
    assert conn.frame()[0] == {"id": 100, "kind": "pong"}
    assert agent.alive()


def test_absurd_lengths_resynchronise_on_the_next_frame(raw) -> None:
    conn = raw()
    conn.send(b"\x7fSBA" + (0xFFFFFFFF).to_bytes(4, "big") + (5).to_bytes(4, "big"))
    conn.send(authed({"op": "ping", "id": 3}))
    frames = [conn.frame()[0], conn.frame()[0]]
    assert frames[0]["code"] == "bad_frame"
    assert frames[1] == {"id": 3, "kind": "pong"}


@pytest.mark.parametrize(
    ("header", "code"),
    [
        ({"op": "ping"}, "bad_request"),  # no id
        ({"op": "teleport", "id": 1}, "unknown_op"),
        ({"op": "exec", "id": 1, "argv": "ls"}, "bad_request"),
        ({"op": "exec", "id": 1, "argv": []}, "bad_request"),
        ({"op": "exec", "id": 1, "argv": ["true"], "timeout": -1}, "bad_request"),
        ({"op": "data", "id": 1}, "unknown_id"),
    ],
)
def test_invalid_requests_get_error_codes(raw, header: dict, code: str) -> None:
    conn = raw()
    conn.send(authed(header))
    reply = conn.frame()[0]
    assert (reply["kind"], reply["code"]) == ("error", code)


def test_a_duplicate_id_of_a_running_request_is_refused(raw) -> None:
    conn = raw()
    conn.send(authed({"op": "exec", "id": 5, "argv": ["sleep", "1000"], "timeout": 2}))
    conn.send(authed({"op": "exec", "id": 5, "argv": ["true"]}))
    assert conn.frame()[0]["code"] == "duplicate_id"


def test_frames_split_into_single_bytes_are_reassembled(agent_module) -> None:
    parser = agent_module.FrameParser()
    data = encode_frame({"op": "ping", "id": 1}, b"payload") * 2
    out = []
    for i in range(len(data)):
        out += parser.feed(data[i : i + 1])
    assert [item[0] for item in out] == ["frame", "frame"]
    assert out[0][1] == {"op": "ping", "id": 1} and out[0][2] == b"payload"


# --------------------------------------------------------------------------- bounded output


def test_exec_keeps_at_most_keep_bytes_and_counts_the_rest(client: AgentClient) -> None:
    import tracemalloc

    script = "head -c 20000000 /dev/zero; head -c 20000000 /dev/zero >&2"
    streamed = [0, 0]
    tracemalloc.start()
    try:
        result = client.exec(
            ["sh", "-c", script],
            timeout=120,
            keep=1000,
            on_stdout=lambda chunk: streamed.__setitem__(0, streamed[0] + len(chunk)),
            on_stderr=lambda chunk: streamed.__setitem__(1, streamed[1] + len(chunk)),
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.exit_code == 0
    assert (result.stdout, result.stderr) == (b"\0" * 1000, b"\0" * 1000)
    assert (result.stdout_size, result.stderr_size) == (20_000_000, 20_000_000)
    assert result.truncated
    assert streamed == [20_000_000, 20_000_000]  # the callbacks still see all of it
    # 40 MB went through; what this call held at once is bounded by its frame queue.
    assert peak < 12 << 20, peak


def test_a_slow_consumer_holds_back_the_guest_not_the_host_memory(client: AgentClient) -> None:
    import tracemalloc

    def slow(_chunk: bytes) -> None:
        time.sleep(0.01)

    tracemalloc.start()
    try:
        result = client.exec(
            ["head", "-c", "30000000", "/dev/zero"], timeout=120, keep=0, on_stdout=slow
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.stdout_size == 30_000_000 and result.stdout == b""
    assert peak < 12 << 20, peak


# --------------------------------------------------------------------------- failed uploads


def test_data_of_a_failed_upload_is_dropped_quietly(short_dir: str) -> None:
    """An upload that fails mid-way (here: a file size limit) gets one error; the chunks the
    host had already sent for it get none, and the stream answers the next request at once."""
    import resource

    path = f"{short_dir}/agent.sock"
    stored = f"{short_dir}/credential"
    Path(stored).write_text(hashlib.sha256(CREDENTIAL.encode()).hexdigest())

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    proc = subprocess.Popen(
        [
            sys.executable,
            "-I",
            "-S",
            str(AGENT),
            "--listen-unix",
            path,
            "--credential-file",
            stored,
        ],
        stderr=subprocess.DEVNULL,
        preexec_fn=limit_file_size,  # noqa: PLW1509 - a plain rlimit, no threads yet
    )
    running = RunningAgent(proc, path)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.02)
        from .conftest import RawConnection

        time.sleep(0.2)
        conn = RawConnection(running.connect())
        conn.send(authed({"op": "put", "id": 5, "path": f"{short_dir}/big", "mode": 420}))
        assert conn.frame()[0]["kind"] == "ready"
        chunk = b"x" * (256 << 10)
        for _ in range(12):  # 3 MiB against a 1 MiB limit: the failure comes mid-way
            conn.send(authed({"op": "data", "id": 5}, chunk))
        conn.send(authed({"op": "ping", "id": 6}))
        frames = [conn.frame()[0]]
        while frames[-1].get("kind") != "pong":
            frames.append(conn.frame()[0])
        assert [f["kind"] for f in frames] == ["error", "pong"], frames
        assert frames[0]["id"] == 5 and frames[0]["code"] in ("io_error", "no_space")
        assert not [
            n for n in os.listdir(short_dir) if n not in ("agent.sock", "credential")
        ]  # nothing half-written
        # An id never used for an upload still gets its error.
        conn.send(authed({"op": "data", "id": 77}, b"x"))
        assert conn.frame()[0]["code"] == "unknown_id"
        # And the id can be used again for a new upload, whose data is taken.
        conn.send(authed({"op": "put", "id": 5, "path": f"{short_dir}/small", "mode": 420}))
        assert conn.frame()[0]["kind"] == "ready"
        digest = hashlib.sha256(b"again").hexdigest()
        conn.send(authed({"op": "data", "id": 5, "eof": True, "sha256": digest}, b"again"))
        assert conn.frame()[0] == {
            "id": 5,
            "kind": "result",
            "size": 5,
            "sha256": digest,
            "path": f"{short_dir}/small",
        }
    finally:
        stop_agent(running)


def test_call_ids_differ_between_clients(agent: RunningAgent) -> None:
    """A reply still in flight for an earlier connection (virtio-serial keeps one stream)
    must never be taken for a reply of the next client's calls."""
    first, second = (
        AgentClient(agent.connect, credential=CREDENTIAL),
        AgentClient(agent.connect, credential=CREDENTIAL),
    )
    try:
        assert abs(next(first._ids) - next(second._ids)) > 1000
    finally:
        first.close()
        second.close()


def test_an_aborted_upload_leaves_nothing_and_gets_no_reply(raw, short_dir: str) -> None:
    conn = raw()
    conn.send(authed({"op": "put", "id": 8, "path": f"{short_dir}/gone", "mode": 420}))
    assert conn.frame()[0]["kind"] == "ready"
    conn.send(authed({"op": "data", "id": 8}, b"x" * 1000))
    conn.send(authed({"op": "data", "id": 8, "abort": True}))
    conn.send(authed({"op": "data", "id": 8}, b"late chunk"))  # was already on its way
    conn.send(authed({"op": "ping", "id": 9}))
    assert conn.frame()[0] == {"id": 9, "kind": "pong"}
    assert not [n for n in os.listdir(short_dir) if n not in ("agent.sock", "credential")]
