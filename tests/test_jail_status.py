"""The jail setting as operators see it: /readyz says whether VMMs are jailed, loudly when not."""

from __future__ import annotations

from django.test import Client

from vms.hypervisors.jail import OFF_WARNING


def test_readyz_warns_when_vmms_are_not_jailed(settings) -> None:  # noqa: ANN001
    settings.SANDBOX_JAIL = "off"
    body = Client().get("/readyz").json()
    assert body["vmm_jail"] == {"mode": "off", "jailed": False, "warning": OFF_WARNING}
    assert body["warnings"] == [OFF_WARNING]


def test_readyz_says_vmms_are_jailed_without_a_warning(settings) -> None:  # noqa: ANN001
    settings.SANDBOX_JAIL = "on"
    body = Client().get("/readyz").json()
    assert body["vmm_jail"] == {"mode": "on", "jailed": True}
    assert "warnings" not in body
