"""The bare baseline of bench/api.py: a minimal ASGI app answering the API's list and retrieve.

No Django, no DRF, no middleware: one coroutine per request that parses the bearer token, runs
the product's own token lookup SQL and checks the token as the product does (peppered HMAC of
the secret, revoked, expired, user active, ``last_used_at`` written at most once a minute), then
runs the product's own list or retrieve SQL and answers its rows as JSON. The SQL, with the
parameters the product bound, is captured from the product by bench/api.py in the same run and
handed over in the JSON file named by ``BARE_API_CONFIG``; the user id and the VM id among those
parameters are replaced by the request's. Served by uvicorn with as many processes as the
product's web tier, each with a psycopg pool of as many connections as the product's read lane.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool

CONFIG: dict[str, Any] = json.loads(Path(os.environ["BARE_API_CONFIG"]).read_text())
TOKEN_RE = re.compile(r"^sbx_([a-z0-9]{12})_([A-Za-z0-9_-]{43})$")
RETRIEVE_RE = re.compile(r"^/api/v1/vms/([0-9a-f-]{36})/$")
LAST_USED_GRANULARITY = timedelta(minutes=1)
PEPPERS = {int(k): v.encode() for k, v in CONFIG["peppers"].items()}

_pool: AsyncConnectionPool | None = None


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "uuid" in value:
        return uuid.UUID(value["uuid"])
    return value


def _bind(statement: dict[str, Any], user_id: int, vm_id: uuid.UUID | None) -> list[Any]:
    params = [_decode(p) for p in statement["params"]]
    for index in statement["user_slots"]:
        params[index] = user_id
    for index in statement["vm_slots"]:
        params[index] = vm_id
    return params


async def _respond(send: Any, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _authenticate(conn: Any, headers: list[tuple[bytes, bytes]]) -> dict[str, Any] | None:
    """The token's row (token and user columns by name, token's first), or None."""
    auth = next((v for k, v in headers if k == b"authorization"), b"").decode()
    scheme, _, raw = auth.partition(" ")
    match = TOKEN_RE.match(raw.strip()) if scheme.lower() == "bearer" else None
    if match is None:
        return None
    key, secret = match.groups()
    cur = await conn.execute(CONFIG["token_sql"], [key])
    rows = await cur.fetchall()
    if not rows:
        return None
    row: dict[str, Any] = {}
    for column, value in zip(cur.description, rows[0], strict=True):
        row.setdefault(column.name, value)  # the token's columns come first (its id, ...)
    pepper = PEPPERS.get(row["pepper_version"])
    if pepper is None:
        return None
    expected = hmac.new(pepper, secret.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, row["digest"]):
        return None
    now = datetime.now(UTC)
    if row["revoked_at"] is not None or (
        row["expires_at"] is not None and row["expires_at"] <= now
    ):
        return None
    if not row["is_active"]:
        return None
    if row["last_used_at"] is None or now - row["last_used_at"] >= LAST_USED_GRANULARITY:
        await conn.execute(CONFIG["last_used_sql"], [now, "127.0.0.1", row["id"]])
    return row


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _pool
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _pool = AsyncConnectionPool(
                    CONFIG["dsn"],
                    min_size=CONFIG["pool_size"],
                    max_size=CONFIG["pool_size"],
                    kwargs={"autocommit": True, "prepare_threshold": CONFIG["prepare_threshold"]},
                    open=False,
                )
                await _pool.open(wait=True)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if _pool is not None:
                    await _pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    assert _pool is not None
    path = scope["path"]
    vm_id = None
    if path == "/api/v1/vms/":
        statements = CONFIG["list"]
    elif match := RETRIEVE_RE.match(path):
        statements = CONFIG["retrieve"]
        vm_id = uuid.UUID(match.group(1))
    else:
        await _respond(send, 404, b'{"detail": "Not found."}')
        return
    async with _pool.connection() as conn:
        token = await _authenticate(conn, scope["headers"])
        if token is None:
            await _respond(send, 401, b'{"detail": "Invalid token."}')
            return
        for one in statements:  # as the product runs them; the last one's rows are the answer
            cur = await conn.execute(one["sql"], _bind(one, token["user_id"], vm_id))
        names = [c.name for c in cur.description]
        rows = [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]
    if vm_id is not None:
        if not rows:
            await _respond(send, 404, b'{"detail": "Not found."}')
            return
        body = json.dumps(rows[0], default=str).encode()
    else:
        body = json.dumps({"results": rows}, default=str).encode()
    await _respond(send, 200, body)
