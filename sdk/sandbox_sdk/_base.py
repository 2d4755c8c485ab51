"""What the sync and async sandboxes share that is not I/O: their view of a VM and a snapshot,
and the TLS context of their HTTP clients."""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Snapshot:
    id: str
    name: str
    state: str
    vm_id: str | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, body: dict[str, Any]) -> Snapshot:
        return cls(
            id=str(body["id"]),
            name=body.get("name") or "",
            state=body.get("state") or "",
            vm_id=None if body.get("vm") is None else str(body.get("vm")),
            raw=body,
        )


def snapshot_id(snapshot: Snapshot | str) -> str:
    return snapshot.id if isinstance(snapshot, Snapshot) else str(snapshot)


class VMView:
    """A VM as the API last showed it (``info``); ``refresh()`` reads it again."""

    info: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.info["id"])

    @property
    def name(self) -> str:
        return str(self.info.get("name", ""))

    @property
    def state(self) -> str:
        return str(self.info.get("state", ""))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.id} {self.state}>"


@functools.cache
def tls_context() -> ssl.SSLContext:
    """httpx's default TLS context (its CA bundle), built once for every client of the process:
    building it takes tens of milliseconds, which a client per call (the MCP server's, over
    HTTP) paid each time."""
    return httpx.create_ssl_context()
