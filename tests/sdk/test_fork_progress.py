"""A fork of N from the SDK and the CLI waits on the whole fork's status (its
``fork_status_url``) with a progress callback / bar, then on each VM (a failed one raises with its
reason); against a server that names no fork status (older), it waits on each VM as before. The
server's side of the status is tested in tests/dashboard/test_pools_fork_pages.py and
tests/vms/test_fork_status.py; here the API is played by a mock transport."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from sandbox_sdk import Client, RequestFailed, Sandbox, _core, sync
from sandbox_sdk.cli import cli

SOURCE = "11111111-1111-1111-1111-111111111111"
SNAP = "22222222-2222-2222-2222-222222222222"
IDS = ["33333333-3333-3333-3333-33333333333" + str(i) for i in range(3)]


class FakeApi:
    """The fork's answers: its status pending for ``pending_reads`` reads, then settled (the
    VMs in ``failed`` failed, the others running)."""

    def __init__(self, *, pending_reads: int = 2, failed: frozenset[int] = frozenset(),
                 names_status: bool = True) -> None:  # fmt: skip
        self.reads, self.pending_reads = 0, pending_reads
        self.failed, self.names_status = failed, names_status
        self.seen: list[str] = []

    def vm(self, i: int) -> dict[str, Any]:
        state = "failed" if i in self.failed else "running"
        return {"id": IDS[i], "name": f"src-fork-{i + 1}", "state": state}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/api/v1")
        self.seen.append(f"{request.method} {path}")
        if request.method == "POST" and path == f"/vms/{SOURCE}/fork/":
            body = {
                "status_url": "/api/v1/requests/snap/",
                "snapshot": {"id": SNAP},
                "vms": [{"id": IDS[i], "status_url": f"/api/v1/requests/r{i}/"} for i in range(3)],
            }
            if self.names_status:
                body["fork_status_url"] = f"/api/v1/vms/{SOURCE}/forks/{SNAP}/"
            return httpx.Response(202, json=body)
        if path == f"/vms/{SOURCE}/forks/{SNAP}/":
            self.reads += 1
            settled = 0 if self.reads <= self.pending_reads else 3
            failed = len(self.failed) if settled else 0
            return httpx.Response(200, json={
                "count": 3, "settled": settled, "pending": 3 - settled, "failed": failed,
                "running": settled - failed, "other": 0, "done": settled == 3, "vms": [],
            })  # fmt: skip
        if path.startswith("/requests/r"):
            i = int(path.removeprefix("/requests/r").strip("/"))
            if self.reads <= self.pending_reads and self.names_status:
                return httpx.Response(200, json={"state": "pending", "outcome": None, "vm": None})
            if i in self.failed:
                outcome = {"type": "vm.restore_failed", "data": {"reason": "no room"}}
                return httpx.Response(200, json={"state": "failed", "outcome": outcome})
            return httpx.Response(200, json={"state": "succeeded", "vm": self.vm(i)})
        if path == f"/vms/{SOURCE}/":
            return httpx.Response(200, json={"id": SOURCE, "name": "src", "state": "running"})
        return httpx.Response(404, json={"detail": "not found"})


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_core, "POLL_FIRST_S", 0.0)
    monkeypatch.setattr(_core, "POLL_MAX_S", 0.0)


def served(monkeypatch: pytest.MonkeyPatch, api: FakeApi) -> None:
    """Every SDK client (the CLI's too) talks to ``api``."""
    real = httpx.Client

    def client(*args: Any, **kwargs: Any) -> httpx.Client:
        kwargs.pop("verify", None)
        return real(*args, transport=httpx.MockTransport(api), **kwargs)

    monkeypatch.setattr(sync.httpx, "Client", client)


def test_fork_waits_for_all_n_and_reports_k_of_n(monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeApi(pending_reads=2)
    served(monkeypatch, api)
    client = Client("http://127.0.0.1:9", "t")
    seen: list[tuple[int, int]] = []
    made = Sandbox.connect(SOURCE, client=client).fork(
        3, keep=True, progress=lambda s: seen.append((s["settled"], s["count"]))
    )
    assert seen == [(0, 3), (0, 3), (3, 3)]
    assert [m.name for m in made] == ["src-fork-1", "src-fork-2", "src-fork-3"]
    assert [m.state for m in made] == ["running"] * 3
    # Each VM's own status is read once, after the fork settled.
    assert sum(1 for s in api.seen if s.startswith("GET /requests/r")) == 3


def test_a_failed_vm_of_the_fork_raises_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    served(monkeypatch, FakeApi(pending_reads=0, failed=frozenset({1})))
    client = Client("http://127.0.0.1:9", "t")
    with pytest.raises(RequestFailed, match="no room"):
        Sandbox.connect(SOURCE, client=client).fork(3, keep=True)


def test_an_older_server_without_a_fork_status_is_waited_on_per_vm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = FakeApi(names_status=False)
    served(monkeypatch, api)
    client = Client("http://127.0.0.1:9", "t")
    made = Sandbox.connect(SOURCE, client=client).fork(3, keep=True, progress=lambda s: None)
    assert len(made) == 3 and not any("/forks/" in s for s in api.seen)


def test_the_cli_shows_a_progress_bar_and_the_n_vms(monkeypatch: pytest.MonkeyPatch) -> None:
    served(monkeypatch, FakeApi(pending_reads=1))
    env = {"SANDBOX_URL": "http://127.0.0.1:9", "SANDBOX_TOKEN": "t"}
    result = CliRunner().invoke(cli, ["-o", "json", "vm", "fork", SOURCE, "--count", "3"], env=env)
    assert result.exit_code == 0, result.output
    assert [v["name"] for v in json.loads(result.stdout)] == [
        "src-fork-1", "src-fork-2", "src-fork-3",
    ]  # fmt: skip
    assert "forking" in result.stderr and "3 running, 0 failed, 0 pending" in result.stderr
