"""The jail as the rest of the product sees it: /readyz says whether VMMs are jailed (loudly
when not), and host code reading a jailed VMM's files does not follow links it planted."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest
from django.test import Client

from vms import console
from vms.hypervisors.base import RuntimeDir
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


class _Sub:
    def __init__(self) -> None:
        self.statuses: list[dict[str, object]] = []
        self.data = bytearray()

    def deliver(self, chunk: bytes) -> None:
        self.data += chunk

    def notify(self, status: dict[str, object]) -> None:
        self.statuses.append(status)


@pytest.mark.django_db(transaction=True)  # the hub asks which secrets the VM was given
async def test_the_console_reads_only_a_serial_socket_the_vmm_itself_serves(
    tmp_path: Path,
) -> None:
    vm_id = str(uuid.uuid4())  # a VM id, as the hub is always given one
    rt = RuntimeDir(tmp_path / "vm")  # short: a unix socket path has a length limit
    rt.create()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"guest output")
        await writer.drain()
        await reader.read()

    server = await asyncio.start_unix_server(serve, path=str(rt.serial_socket))
    # The socket is served by this process; vmm.pid names another (a VMM that linked a
    # foreign socket where its own should be looks just like this).
    rt.pidfile.write_text(f"{os.getppid()}\n")
    hub = console.ConsoleHub(vm_id, rt.serial_socket, rt.serial_log)
    sub = _Sub()
    try:
        await hub._attach(sub)
        for _ in range(200):
            if any("not the VMM" in str(s.get("reason", "")) for s in sub.statuses):
                break
            await asyncio.sleep(0.01)
        assert any("not the VMM" in str(s.get("reason", "")) for s in sub.statuses)
        assert not hub.connected and sub.data == b""
        rt.pidfile.write_text(f"{os.getpid()}\n")  # now the server is "the VMM"
        for _ in range(300):
            if sub.data:
                break
            await asyncio.sleep(0.01)
        assert hub.connected and sub.data == b"guest output"
    finally:
        await hub.close()
        server.close()
        await server.wait_closed()
