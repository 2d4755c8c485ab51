"""The console of a guest that was given a secret, through the real websocket consumer: what
the guest prints is masked before the browser gets it and before the recording holds it, even
when the value arrives in pieces, and a value typed into the console is masked in the
recording too."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from channels.db import database_sync_to_async

from accounts.caller import Caller
from secretstore import commands as secrets
from tests.dashboard.test_consumers import _bytes_until, _json_until, console_relay_here

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_stopped")]
console_relay_here = console_relay_here  # the relay in this process, stopped with the test

VALUE = b"console-secret-8f3a2b"


def _vm_with_secret(make_user: Any, make_vm: Any) -> Any:
    from vms import commands
    from vms.models import VirtualMachine

    owner = make_user("operator")
    caller = Caller.for_user(owner, channel="api")
    secrets.create_secret(caller, name="DB_PASSWORD", value=VALUE)
    vm = commands.create(
        caller,
        name="with-secret",
        template="linux-small",
        start_now=False,
        secrets=[{"name": "DB_PASSWORD", "file": "/run/secrets/db"}],
    ).vm
    return owner, VirtualMachine.objects.get(pk=vm.pk)


async def test_console_output_and_recording_are_masked(
    make_user, make_vm, ws_connect, fake_serial, console_dir
) -> None:
    owner, vm = await database_sync_to_async(_vm_with_secret)(make_user, make_vm)
    serial = await fake_serial(vm)
    op = await ws_connect(f"/ws/vms/{vm.pk}/console/", owner)
    assert (await op.connect())[0]
    await _json_until(op, lambda m: m["type"] == "session")
    await serial.wait_connected()
    await _json_until(op, lambda m: m["type"] == "link" and m["connected"])

    # The value in three pieces, with a pause between them, then a prompt.
    await serial.output(b"# cat /run/secrets/db\r\n" + VALUE[:5])
    await asyncio.sleep(0.1)
    await serial.output(VALUE[5:12])
    await asyncio.sleep(0.1)
    await serial.output(VALUE[12:] + b"\r\n# ")
    seen = await _bytes_until(op, b"[secret:DB_PASSWORD]\r\n# ")
    assert VALUE not in seen and VALUE[:8] not in seen
    # Typed, one key at a time.
    for byte in VALUE:
        await op.send_to(bytes_data=bytes([byte]))
    for _ in range(200):
        if VALUE in serial.received:
            break
        await asyncio.sleep(0.02)
    assert VALUE in serial.received, "the keys reach the guest unchanged"
    await op.disconnect()

    recordings = list(Path(console_dir).rglob("*.cast"))
    assert len(recordings) == 1
    data = recordings[0].read_bytes()
    assert VALUE not in data
    frames = [json.loads(line) for line in data.decode().splitlines()[1:]]
    assert "[secret:DB_PASSWORD]" in "".join(f[2] for f in frames if f[1] == "o")
    assert "".join(f[2] for f in frames if f[1] == "i") == "[secret:DB_PASSWORD]"
