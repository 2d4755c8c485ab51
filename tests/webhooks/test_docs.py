"""docs/webhooks.md's Python, run as it is: its ``verify`` accepts real deliveries and refuses
forged, altered and stale ones; its receiver, on 127.0.0.1, handles each event once and refuses
what does not verify."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from accounts.caller import Caller
from webhooks import commands, dispatch, signing
from webhooks.models import Delivery

pytestmark = pytest.mark.django_db

DOC = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_the_pages_verify_accepts_deliveries_and_refuses_the_rest(
    receiver, subscribe, pump_until
) -> None:
    namespace: dict = {"__name__": "docs_example"}
    exec(compile(examples()[0], str(DOC), "exec"), namespace)
    verify = namespace["verify"]
    issued = subscribe(receiver.url, ["webhook.pinged"])
    commands.ping(Caller.for_user(issued.subscription.owner), issued.subscription)
    pump_until(lambda: receiver.requests, what="the ping")
    got = receiver.requests[0]
    header = got.headers["Sandbox-Signature"]
    assert verify(issued.secret, got.body, header)
    assert not verify(issued.secret, got.body.replace(b"pinged", b"pwned"), header)
    assert not verify(signing.new_secret(), got.body, header)
    assert not verify(issued.secret, got.body, "v1=" + header.split("v1=")[1])
    stale = signing.signature_header([issued.secret], got.body, int(time.time()) - 600)
    assert not verify(issued.secret, got.body, stale)
    assert verify(issued.secret, got.body, stale, tolerance_s=900)


def test_the_pages_receiver_handles_each_event_once(
    subscribe, pump_until, monkeypatch, capsys
) -> None:
    # The receiver reads its secret from its environment (here: set once subscribed).
    monkeypatch.setenv("SANDBOX_WEBHOOK_SECRET", "whsec_placeholder")
    namespace: dict = {"__name__": "docs_example"}
    for code in examples():
        exec(compile(code, str(DOC), "exec"), namespace)
    server = ThreadingHTTPServer(("127.0.0.1", 0), namespace["Hook"])
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        issued = subscribe(url, ["webhook.*"])
        namespace["SECRET"] = issued.secret
        sub = issued.subscription
        owner = Caller.for_user(sub.owner)
        first = commands.ping(owner, sub)
        commands.update(owner, sub, description="docs")
        pump_until(
            lambda: Delivery.objects.filter(status="delivered").count() == 2, what="two events"
        )
        # The first one arrives again (a worker died after sending it): handled once.
        again = Delivery.objects.get(event_position=first.position)
        Delivery.objects.filter(pk=again.pk).update(
            status="pending", next_attempt_at=again.created_at
        )
        pump_until(lambda: Delivery.objects.get(pk=again.pk).status == "delivered")
        dispatch.pump(max_seconds=1)
        printed = capsys.readouterr().out.splitlines()
        assert [line.split()[1] for line in printed] == ["webhook.pinged", "webhook.updated"]
        assert printed[0].split()[0] == str(first.position)
        # A forged delivery is refused.
        request = urllib.request.Request(
            url, data=json.dumps({"event": {}}).encode(), method="POST",
            headers={"Sandbox-Signature": f"t={int(time.time())},v1=00", "Sandbox-Event-Id": "x"},
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 401
    finally:
        server.shutdown()
        server.server_close()
