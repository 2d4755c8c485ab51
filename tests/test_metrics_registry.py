"""Each app registers its own metrics (``<app>/metrics.py``, from its ``AppConfig.ready``) in the
process's registry (``core.metrics``), once; /metrics serves every family it always served."""

from __future__ import annotations

from collections import Counter as Tally

import pytest
from django.apps import apps
from django.test import Client
from prometheus_client import Counter

from audit import metrics as audit_metrics
from audit.actor import Actor
from core import metrics
from sandbox_site import metrics as site_metrics
from vms import metrics as vms_metrics
from webhooks import metrics as webhooks_metrics

pytestmark = pytest.mark.django_db

APP_METRICS = {
    "audit": audit_metrics,
    "vms": vms_metrics,
    "webhooks": webhooks_metrics,
    "sandbox_site": site_metrics,
}

# Every family /metrics has exported (counters by their name without ``_total``).
FAMILIES = {
    "sandbox_http_requests",
    "sandbox_http_request_seconds",
    "sandbox_events_appended",
    "sandbox_event_append_failures",
    "sandbox_event_store_head_position",
    "sandbox_projection_lag_events",
    "sandbox_audit_digest_age_seconds",
    "sandbox_audit_events_unsigned",
    "sandbox_audit_digest_sequence",
    "sandbox_audit_last_verification_ok",
    "sandbox_audit_last_verification_timestamp_seconds",
    "sandbox_audit_last_digest_failure_timestamp_seconds",
    "sandbox_worker_heartbeat_age_seconds",
    "sandbox_worker_up",
    "sandbox_pool_members",
    "sandbox_pool_target",
    "sandbox_vm_cpu_seconds",
    "sandbox_vm_cpu_percent",
    "sandbox_vm_memory_rss_bytes",
    "sandbox_vm_disk_read_bytes",
    "sandbox_vm_disk_write_bytes",
    "sandbox_vm_network_receive_bytes",
    "sandbox_vm_network_transmit_bytes",
    "sandbox_vm_guest_uptime_seconds",
    "sandbox_vm_guest_load1",
    "sandbox_vm_guest_memory_available_bytes",
    "sandbox_vm_guest_processes",
    "sandbox_webhook_deliveries",
    "sandbox_webhook_subscriptions",
    "sandbox_webhook_dispatch_lag_events",
}


def _families() -> Tally[str]:
    return Tally(family.name for family in metrics.REGISTRY.collect())


def _described(collectors: tuple[object, ...]) -> set[str]:
    return {family.name for c in collectors for family in c.describe()}  # type: ignore[attr-defined]


def test_each_apps_collectors_are_registered_exactly_once_after_ready() -> None:
    for label in APP_METRICS:
        apps.get_app_config(label).ready()  # again: what a second setup or a test runner does
    families = _families()
    assert set(families) == FAMILIES
    assert all(n == 1 for n in families.values()), families
    for label, module in APP_METRICS.items():
        names = _described(module.COLLECTORS)
        assert names, label
        assert all(families[name] == 1 for name in names), (label, names)
    # Each app exports its own families: no name belongs to two apps.
    owners = Tally(n for module in APP_METRICS.values() for n in _described(module.COLLECTORS))
    assert set(owners) == FAMILIES and set(owners.values()) == {1}


def test_registering_again_is_a_no_op_and_a_name_clash_is_refused() -> None:
    before = _families()
    metrics.register(*audit_metrics.COLLECTORS)
    assert _families() == before
    clash = Counter("sandbox_events_appended_total", "a second owner", registry=None)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        metrics.register(clash)
    assert _families() == before


def test_the_store_counts_into_the_audit_apps_counters() -> None:
    from audit import store

    appended = audit_metrics.EVENTS_APPENDED.labels("user.role_changed")
    before = appended._value.get()
    store.append("user", "m1", "user.role_changed", {"role": "viewer"}, actor=Actor.system())
    assert appended._value.get() == before + 1
    body = Client().get("/metrics").content.decode()
    assert 'sandbox_events_appended_total{type="user.role_changed"}' in body
