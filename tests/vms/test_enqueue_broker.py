"""Tasks are handed to the worker through one broker per process (``vms.enqueue.broker``): with
Redis, one connection, not a new one (and its handshake) for every task on a user's time."""

from __future__ import annotations

import multiprocessing
import uuid

import pytest

from vms import enqueue


def test_one_process_enqueues_through_one_broker_and_a_forked_child_makes_its_own() -> None:
    first = enqueue.broker()
    assert enqueue.broker() is first
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        child_id = pool.apply(_broker_id)
    assert child_id != id(first)


def _broker_id() -> int:
    return id(enqueue.broker())


def test_enqueued_tasks_share_one_redis_connection() -> None:
    from django_q.brokers import get_broker
    from django_q.brokers.redis_broker import Redis

    broker = get_broker()  # the test's own look at the queue (its connection opened now)
    if not isinstance(broker, Redis):
        pytest.skip("the broker is not Redis here (the ORM broker opens no connection of its own)")
    conn = broker.connection
    enqueue.snapshot_cleanup(str(uuid.uuid4()))  # this process's broker connected, if need be
    before_len = conn.llen(broker.list_key)
    received = int(conn.info("stats")["total_connections_received"])
    try:
        for _ in range(5):
            enqueue.snapshot_cleanup(str(uuid.uuid4()))
        assert conn.llen(broker.list_key) == before_len + 5
        assert int(conn.info("stats")["total_connections_received"]) == received
    finally:
        # Nobody runs them: tests of the worker cluster start later in this run.
        added = conn.llen(broker.list_key) - before_len + 1
        if added > 0:
            conn.rpop(broker.list_key, added)
