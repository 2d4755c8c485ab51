"""The jail as the rest of the product sees it: /readyz says whether VMMs are jailed (loudly
when not), and host code reading a jailed VMM's files does not follow links it planted."""

from __future__ import annotations

from pathlib import Path

from django.test import Client

from vms import console
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


def test_console_scrollback_never_follows_a_link_the_vmm_put_in_place_of_its_log(
    tmp_path: Path,
) -> None:
    # A jailed VMM owns console.log and may replace it; the host reads it as root.
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"host secret\n")
    log = tmp_path / "console.log"
    log.symlink_to(secret)
    assert console._tail(log, 4096) == b""
    log.unlink()
    log.write_bytes(b"booting\nlogin: ")
    assert console._tail(log, 4096) == b"booting\nlogin: "
