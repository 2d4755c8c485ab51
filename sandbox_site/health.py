"""/healthz (the process answers) and /readyz (database, broker and channel layer reachable, and
a worker cluster taking tasks: ``vms.heartbeat``)."""

from __future__ import annotations

import time
import uuid

import redis
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django_q.models import OrmQ

from vms import heartbeat, runtime


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def _check_database() -> str:
    with connection.cursor() as cur:
        cur.execute("SELECT 1")
        cur.fetchone()
    return connection.vendor


def _check_broker() -> str:
    if settings.REDIS_URL:
        client = redis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2
        )
        try:
            client.ping()
        finally:
            client.close()
        return "redis"
    # The ORM broker lives in the database checked above.
    OrmQ.objects.exists()
    return "orm"


def _check_channel_layer() -> str:
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("no channel layer configured")

    async def round_trip() -> None:
        channel = await layer.new_channel("readyz.")
        token = uuid.uuid4().hex
        await layer.send(channel, {"type": "readyz.ping", "token": token})
        message = await layer.receive(channel)
        if message.get("token") != token:
            raise RuntimeError("channel layer returned a different message")

    async_to_sync(round_trip)()
    return type(layer).__name__


def _check_worker() -> str:
    return heartbeat.check()


def readyz(request: HttpRequest) -> JsonResponse:
    checks: dict[str, dict[str, object]] = {}
    probes = [
        ("database", _check_database),
        ("broker", _check_broker),
        ("channel_layer", _check_channel_layer),
    ]
    if getattr(settings, "SANDBOX_WORKER_STALE_S", 90) > 0:  # 0: no worker expected to answer
        probes.append(("worker", _check_worker))
    for name, check in probes:
        started = time.perf_counter()
        try:
            checks[name] = {"ok": True, "backend": check()}
        except Exception as exc:  # noqa: BLE001 - any failure means not ready; say which
            checks[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        checks[name]["ms"] = round((time.perf_counter() - started) * 1000, 2)
    ready = all(c["ok"] for c in checks.values())
    # Not a readiness condition (SANDBOX_JAIL=off is a choice), but said loudly when off.
    jail = runtime.jail_config().describe()
    body: dict[str, object] = {"status": "ready" if ready else "not ready", "checks": checks}
    body["vmm_jail"] = jail
    if "warning" in jail:
        body["warnings"] = [jail["warning"]]
    return JsonResponse(
        body,
        status=200 if ready else 503,
    )
