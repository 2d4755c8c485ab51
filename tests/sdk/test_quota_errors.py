"""The SDK's typed quota refusal carries the group of a team budget (docs/quotas.md)."""

from __future__ import annotations

from sandbox_sdk.errors import QuotaExceeded, error_from


def test_a_team_budgets_refusal_names_its_group() -> None:
    body = {
        "detail": "group team-a's team quota vms exceeded: 3 in use + 1 requested > limit 3",
        "quota": "vms",
        "scope": "group",
        "group": "team-a",
        "limit": 3,
        "used": 3,
        "requested": 1,
    }
    error = error_from(403, body)
    assert isinstance(error, QuotaExceeded)
    assert (error.quota, error.scope, error.group, error.limit) == ("vms", "group", "team-a", 3)


def test_a_users_refusal_has_no_group() -> None:
    error = error_from(403, {"detail": "x", "quota": "vms", "scope": "user", "limit": 1})
    assert isinstance(error, QuotaExceeded) and error.group is None


def test_a_hosts_capacity_refusal_names_its_host() -> None:
    body = {"detail": "x", "quota": "memory_mib", "scope": "host", "host": "h1", "limit": 512}
    error = error_from(403, body)
    assert isinstance(error, QuotaExceeded)
    assert (error.scope, error.host, error.limit) == ("host", "h1", 512)
    cluster = error_from(403, body | {"host": None})
    assert isinstance(cluster, QuotaExceeded) and cluster.host is None
