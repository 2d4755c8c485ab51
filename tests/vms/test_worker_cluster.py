"""The worker cluster in every supported configuration (SQLite + ORM broker, PostgreSQL + ORM
broker, PostgreSQL + Redis): a real ``manage.py worker`` keeps taking tasks, ``/readyz`` sees a
stuck cluster, ``serve`` leaves nothing behind, a forked process never shares its parent's
database connections, and no VMM a worker started stays a zombie.

CI runs this file in each configuration (``.ci/run``)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.db import connection
from django.test import Client

from tests.vms.conftest import ROOT, Worker, wait_for
from vms.hypervisors import process
from vms.hypervisors.base import RuntimeDir


def _children_of(pid: int) -> set[int]:
    """Every descendant of ``pid`` (from /proc), the living and the zombies."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


# --- Fork safety --------------------------------------------------------------------------------


def _child_queries(conn_out) -> None:  # runs in a forked child
    from django.db import connection as child_connection

    try:
        pids = set()
        for _ in range(12):  # past psycopg's prepare threshold: prepared statements are made
            with child_connection.cursor() as cur:
                cur.execute("SELECT pg_backend_pid(), %s::int", [1])
                pids.add(cur.fetchone()[0])
        conn_out.send(("ok", sorted(pids)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        conn_out.send(("error", repr(exc)))
    finally:
        child_connection.close()


@pytest.mark.django_db
def test_a_forked_child_never_uses_its_parents_database_connection(postgres_only) -> None:
    for _ in range(12):
        with connection.cursor() as cur:
            cur.execute("SELECT pg_backend_pid(), %s::int", [1])
            parent_pid = cur.fetchone()[0]
    ctx = multiprocessing.get_context("fork")  # as django-q2 starts its processes
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_queries, args=(writer,))
    child.start()
    # The parent keeps using its connection meanwhile, as django-q2's sentinel does.
    for _ in range(20):
        with connection.cursor() as cur:
            cur.execute("SELECT pg_backend_pid(), %s::int", [1])
            assert cur.fetchone()[0] == parent_pid
    assert reader.poll(30), "the child did not answer"
    status, detail = reader.recv()
    child.join(10)
    assert status == "ok", detail
    assert parent_pid not in detail, "the child talked on its parent's database session"


# --- A real worker process ----------------------------------------------------------------------


def _enqueue(func: str, *args: object) -> str:
    from django_q.tasks import async_task

    return async_task(func, *args)


@pytest.mark.django_db(transaction=True)
def test_the_worker_keeps_taking_tasks(worker_env, tmp_path, settings) -> None:
    """Several rounds of tasks that use the database the way the product does (appends through
    the event store's prepared statements, the reconciler's reads), spread over long enough for
    psycopg to prepare statements and for the pusher to poll the broker many times: each round
    is taken. Filed: on PostgreSQL without Redis the pusher died within a minute."""
    from django_q.models import Failure, Success

    worker_env["SANDBOX_WORKER_HEARTBEAT_S"] = "1"
    w = Worker(worker_env, tmp_path / "worker.log")
    w.start()
    try:
        ids: list[str] = []
        for round_ in range(4):
            batch = [
                _enqueue("audit.tasks.sign_digest"),
                _enqueue("vms.tasks.reconcile"),
                _enqueue("audit.tasks.run_projections"),
            ]
            ids += batch

            def taken(batch: list[str] = batch) -> bool:
                return Success.objects.filter(id__in=batch).count() == len(batch)

            wait_for(taken, 60, f"round {round_} of tasks to be taken", interval=0.3)
            assert not Failure.objects.exists(), list(Failure.objects.values("func", "result"))
            time.sleep(3)
        assert w.proc is not None and w.proc.poll() is None, "the worker exited"
        log = (tmp_path / "worker.log").read_text()
        for symptom in ("Failed to pull task", "already exists", "reincarnated", "Traceback"):
            assert symptom not in log, log[-4000:]
    finally:
        w.stop()
    assert w.proc.returncode == 0, "the worker did not stop cleanly on SIGTERM"


def _cluster_processes(leader: int) -> set[int]:
    return {pid for pid in _children_of(leader) if _alive(pid)}


@pytest.mark.django_db(transaction=True)
def test_readyz_sees_a_stuck_worker_cluster(worker_env, tmp_path, settings) -> None:
    settings.SANDBOX_WORKER_STALE_S = 6
    worker_env.update(SANDBOX_WORKER_HEARTBEAT_S="1", SANDBOX_WORKER_STALE_S="6")
    client = Client()
    body = client.get("/readyz").json()
    assert body["checks"]["worker"]["ok"] is False, "ready with no worker at all"
    w = Worker(worker_env, tmp_path / "worker.log")
    w.start()
    try:
        wait_for(lambda: client.get("/readyz").status_code == 200, 60, "the worker's heartbeat")
        assert w.proc is not None
        # Stuck: every process of the cluster but its main one stops (SIGSTOP), as a pusher or
        # workers hanging on a dead connection do. The processes still exist.
        frozen = _cluster_processes(w.proc.pid)
        assert frozen, "the cluster has no processes"
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:

            def not_ready() -> dict | None:
                response = client.get("/readyz")
                return response.json() if response.status_code == 503 else None

            body = wait_for(not_ready, 30, "/readyz to see the stuck cluster")
            assert body["checks"]["worker"]["ok"] is False
            assert "heartbeat" in body["checks"]["worker"]["error"]
            assert all(body["checks"][n]["ok"] for n in ("database", "broker", "channel_layer"))
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
        wait_for(lambda: client.get("/readyz").status_code == 200, 60, "ready again")
    finally:
        w.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.django_db(transaction=True)
def test_serve_stops_its_worker_cluster_and_everything_it_started(worker_env, tmp_path) -> None:
    """SIGTERM to ``serve`` while a worker is inside a long task: the cluster cannot stop
    gracefully in time, and nothing of it (sentinel, pusher, monitor, workers) may be left
    behind holding database sessions. Filed: qcluster processes outlived serve with a
    connection idle in transaction for 27 minutes."""
    port = _free_port()
    env = dict(worker_env, SANDBOX_WORKER_HEARTBEAT_S="1", SANDBOX_WEB_WORKERS="1")
    env["SANDBOX_WORKER_EXTRA_TASKS"] = "time.sleep"  # not a product task: allowed for this test
    log = (tmp_path / "serve.log").open("ab")
    serve = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    started: set[int] = set()
    try:
        client = Client()
        wait_for(lambda: client.get("/readyz").status_code == 200, 90, "serve to be ready")
        # web, worker main, sentinel, pusher, monitor, worker
        wait_for(lambda: len(_children_of(serve.pid)) >= 6, 60, "the worker cluster")
        _enqueue("time.sleep", 300)  # a worker busy far beyond serve's stop timeout
        time.sleep(3)
        started |= _children_of(serve.pid)
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
        time.sleep(1)  # killed processes are collected by init: a zombie holds no session
        left = {pid for pid in started if _alive(pid)}
        assert not left, f"processes left behind by serve: {left}"
        if connection.vendor == "postgresql":
            with connection.cursor() as cur:
                cur.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state LIKE 'idle in transaction%%' AND pid <> pg_backend_pid()"
                )
                assert cur.fetchone()[0] == 0
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
        for pid in started | _children_of(serve.pid):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# --- VMM children -------------------------------------------------------------------------------


def test_a_vmm_stopped_by_another_process_is_reaped(tmp_path) -> None:
    """A worker process starts a VMM; another stops it (or it powers off): the process that
    started it collects it, so it does not stay a zombie."""
    rt = RuntimeDir(tmp_path / "vm")
    pid = process.spawn_vmm(["sleep", "300"], rt)
    assert _alive(pid)
    os.kill(pid, signal.SIGKILL)  # as another worker process's terminate() does; no wait here
    wait_for(lambda: not _exists(pid), 10, "the dead VMM to be reaped", interval=0.1)
