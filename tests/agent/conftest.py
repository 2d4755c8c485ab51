"""Fixtures that run the real guest agent on this host, over a unix socket.

The agent is the very file that goes into the guest image (images/agent/sandbox_agent.py),
started with ``--listen-unix``; nothing here needs Django, a VMM or root.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

import pytest

from vms.agent.client import AgentClient, encode_frame

AGENT = Path(__file__).resolve().parents[2] / "images" / "agent" / "sandbox_agent.py"
# The credential the agents started here are enrolled with (``start_agent``).
CREDENTIAL = "test-credential-of-the-agent-tests-0123456789"


def authed(header: dict, payload: bytes = b"") -> bytes:
    """A frame carrying the test agents' credential, as the client sends it."""
    return encode_frame({**header, "auth": CREDENTIAL}, payload)


class RunningAgent:
    def __init__(self, proc: subprocess.Popen[bytes], path: str) -> None:
        self.proc = proc
        self.path = path

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.path)
        return sock

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_agent(
    directory: str,
    *extra: str,
    prefix: Sequence[str] = (),
    credential: str | None = CREDENTIAL,
) -> RunningAgent:
    """Run the agent on a unix socket in ``directory``, enrolled with ``credential`` (None: not
    enrolled yet); ``prefix`` wraps the command (e.g. ``ip netns exec NS``)."""
    path = f"{directory}/agent.sock"
    stored = f"{directory}/credential"
    if credential is not None:
        Path(stored).write_text(hashlib.sha256(credential.encode()).hexdigest() + "\n")
    proc = subprocess.Popen(
        [
            *prefix,
            sys.executable,
            "-I",
            "-S",
            str(AGENT),
            "--listen-unix",
            path,
            "--credential-file",
            stored,
            *extra,
        ],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    # The socket file appears at bind(), before listen(): wait for a connect to succeed.
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the agent did not start listening")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.01)
        finally:
            probe.close()
    return RunningAgent(proc, path)


def stop_agent(agent: RunningAgent) -> None:
    if agent.alive():
        agent.proc.terminate()
        try:
            agent.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            agent.proc.kill()
            agent.proc.wait()


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A short directory: unix socket paths are limited to 107 bytes."""
    path = tempfile.mkdtemp(prefix="sbx-ag-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(short_dir: str) -> Iterator[RunningAgent]:
    running = start_agent(short_dir)
    yield running
    stop_agent(running)


@pytest.fixture
def client(agent: RunningAgent) -> Iterator[AgentClient]:
    with AgentClient(agent.connect, timeout=20, credential=CREDENTIAL) as c:
        c.hello(timeout=10)
        yield c


@pytest.fixture(scope="session")
def agent_module() -> ModuleType:
    """The agent file imported as a module, for unit tests of its frame parser."""
    spec = importlib.util.spec_from_file_location("sandbox_agent_under_test", AGENT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def raw(agent: RunningAgent) -> Iterator[Callable[[], RawConnection]]:
    """Connections that speak bytes, for frames the client would never send."""
    opened: list[RawConnection] = []

    def make() -> RawConnection:
        conn = RawConnection(agent.connect())
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        conn.sock.close()


class RawConnection:
    def __init__(self, sock: socket.socket) -> None:
        from vms.agent.client import decode_frames

        self.sock = sock
        self.sock.settimeout(10)
        self.buf = bytearray()
        self._decode = decode_frames

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self) -> tuple[dict, bytes]:
        while True:
            for frame in self._decode(self.buf):
                return frame
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("agent closed the connection")
            self.buf += chunk
