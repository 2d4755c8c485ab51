"""Integrity and worker gauges on /metrics (issue 11, item 8): digest age, events not yet
covered by a digest, the last verification's result and time, the worker heartbeat."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from prometheus_client import generate_latest

from audit import digests
from audit.actor import Actor
from audit.commands import verify_chain
from tests.audit.forgery import sql
from tests.audit.helpers import append_user_events

pytestmark = pytest.mark.django_db
SHELL = Actor.system(channel="shell", name="tests")


@pytest.fixture(autouse=True)
def _own_keys(settings: Any, tmp_path: Path) -> None:
    settings.SANDBOX_DIGEST_ED25519_DIR = tmp_path / "keys"
    settings.SANDBOX_DIGEST_ED25519_KEYS = ""
    settings.SANDBOX_DIGEST_ED25519_CURRENT = "ed25519-1"
    settings.SANDBOX_DIGEST_ALGORITHM = "ed25519"


def gauges() -> dict[str, float]:
    from sandbox_site.metrics import REGISTRY

    out = {}
    for line in generate_latest(REGISTRY).decode().splitlines():
        if line.startswith(("sandbox_audit_", "sandbox_worker_")):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_digest_age_and_unsigned_events() -> None:
    append_user_events("1", 3)
    assert gauges()["sandbox_audit_events_unsigned"] == 3
    assert "sandbox_audit_digest_age_seconds" not in gauges()
    digests.sign_pending()
    append_user_events("2", 2)
    now = gauges()
    assert now["sandbox_audit_events_unsigned"] == 2
    assert now["sandbox_audit_digest_sequence"] == 1
    assert 0 <= now["sandbox_audit_digest_age_seconds"] < 60


def test_the_last_verification_result_and_time(tamper: Any) -> None:
    append_user_events("1", 3)
    before = timezone.now().timestamp()
    verify_chain(SHELL)
    now = gauges()
    assert now["sandbox_audit_last_verification_ok"] == 1
    assert now["sandbox_audit_last_verification_timestamp_seconds"] >= before - 1
    with tamper():
        sql("UPDATE audit_event SET actor_name = 'mallory' WHERE position = 2")
    verify_chain(SHELL)
    assert gauges()["sandbox_audit_last_verification_ok"] == 0


def test_a_refused_signing_shows(tamper: Any) -> None:
    from audit.commands import sign_digest

    append_user_events("1", 3)
    with tamper():
        sql("UPDATE audit_event SET actor_name = 'mallory' WHERE position = 2")
    with pytest.raises(digests.ChainBroken):
        sign_digest(SHELL)
    assert gauges()["sandbox_audit_last_digest_failure_timestamp_seconds"] > 0


def test_the_worker_heartbeat_shows(settings: Any) -> None:
    from vms import heartbeat

    settings.SANDBOX_WORKER_STALE_S = 90
    heartbeat.started(timezone.now())
    queue = heartbeat.queue_name()
    assert gauges()[f'sandbox_worker_up{{queue="{queue}"}}'] == 0
    heartbeat.beat(queue, timezone.now().isoformat())
    now = gauges()
    assert now[f'sandbox_worker_up{{queue="{queue}"}}'] == 1
    assert 0 <= now[f'sandbox_worker_heartbeat_age_seconds{{queue="{queue}"}}'] < 60
