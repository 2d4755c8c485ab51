"""A small, synchronous client for the Cloud Hypervisor REST API on its unix socket.

Cloud Hypervisor serves HTTP/1.1 (Firecracker's micro_http) on the path given to
``--api-socket``; every endpoint lives under ``/api/v1``. The released v53 server differs from its
OpenAPI document in ways that matter here (see ``tests/reference/cloud-hypervisor-notes.md``):

- error bodies are a JSON array of strings (the error chain, top error first); micro_http's own
  parse errors are a ``{"error": "..."}`` object, and a few answers are plain text;
- wrong-state failures are 500, never the 405 the spec lists; ``vmm.shutdown`` answers 200 with an
  empty body where the spec says 204;
- an action endpoint that takes no body rejects one with 400, so none is sent (Content-Length: 0);
- requests are served one at a time, and micro_http caps open connections, so the client opens a
  connection per request and closes it at once.

Every endpoint the driver may call is listed in ``ENDPOINTS``; ``ChApi.call`` refuses any other,
which is what lets the contract tests prove that every request the driver can send is in the
OpenAPI document and validates against it.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .base import HypervisorError
from .process import check_peer

__all__ = [
    "API_PREFIX",
    "ENDPOINTS",
    "ChApi",
    "ChApiError",
    "ChApiUnavailable",
    "Endpoint",
    "UnixHTTPConnection",
    "error_message",
]

API_PREFIX = "/api/v1"


@dataclass(frozen=True)
class Endpoint:
    """One REST endpoint as the driver uses it.

    ``success`` lists the codes the *released* server answers on success (which is not always
    what the spec says: see ``vmm.shutdown``). ``body_schema`` names the OpenAPI component the
    request body must validate against, or None for endpoints that must be sent without a body.
    """

    name: str
    method: Literal["GET", "PUT"]
    body_schema: str | None = None
    success: frozenset[int] = frozenset({204})
    returns_json: bool = False
    slow: bool = False  # may take as long as the guest memory takes to copy

    @property
    def path(self) -> str:
        return f"{API_PREFIX}/{self.name}"


def _endpoints(*items: Endpoint) -> dict[str, Endpoint]:
    return {item.name: item for item in items}


ENDPOINTS: Mapping[str, Endpoint] = _endpoints(
    Endpoint("vmm.ping", "GET", success=frozenset({200}), returns_json=True),
    # The spec says 204; v53 answers 200 with an empty body. Accept both.
    Endpoint("vmm.shutdown", "PUT", success=frozenset({200, 204})),
    Endpoint("vm.create", "PUT", body_schema="VmConfig"),
    Endpoint("vm.boot", "PUT", slow=True),
    Endpoint("vm.shutdown", "PUT"),
    Endpoint("vm.reboot", "PUT"),
    Endpoint("vm.power-button", "PUT"),
    Endpoint("vm.pause", "PUT"),
    Endpoint("vm.resume", "PUT"),
    Endpoint("vm.delete", "PUT"),
    Endpoint("vm.snapshot", "PUT", body_schema="VmSnapshotConfig", slow=True),
    Endpoint("vm.restore", "PUT", body_schema="RestoreConfig", slow=True),
    Endpoint("vm.resize", "PUT", body_schema="VmResize"),
    # 204 when cold-added before vm.boot (how TAP descriptors reach the VMM, see ChApi.call),
    # 200 with the PCI address when hot-plugged.
    Endpoint("vm.add-net", "PUT", body_schema="NetConfig", success=frozenset({200, 204})),
    Endpoint("vm.info", "GET", success=frozenset({200}), returns_json=True),
    Endpoint("vm.counters", "GET", success=frozenset({200}), returns_json=True),
)


class ChApiError(HypervisorError):
    """The server answered with an error status; ``str()`` carries the server's own message."""

    def __init__(self, endpoint: str, status: int, messages: list[str]) -> None:
        self.endpoint = endpoint
        self.status = status
        self.messages = messages
        reason = ": ".join(messages) if messages else http.client.responses.get(status, "error")
        super().__init__(f"{endpoint} failed (HTTP {status}): {reason}")


class ChApiUnavailable(HypervisorError):
    """Nothing answered on the API socket (no VMM, a dead one, or a timeout)."""


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over an AF_UNIX stream socket; the host name is only used in headers."""

    def __init__(
        self,
        path: Path | str,
        timeout: float,
        fds: tuple[int, ...] = (),
        peer_pid: int | None = None,
    ) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = str(path)
        self.peer_pid = peer_pid
        self.fds = fds  # sent once, as SCM_RIGHTS with the first bytes of the request

    def send(self, data: Any) -> None:
        if self.fds and isinstance(data, bytes | bytearray):
            # The first bytes of the request (its headers) carry the descriptors: the server
            # takes them from the read that starts the request. http.client connects lazily
            # inside send, so connect here first or they would ride on the body instead.
            if self.sock is None:
                self.connect()
            fds, self.fds = self.fds, ()
            sent = socket.send_fds(self.sock, [data], list(fds))
            if sent < len(data):
                self.sock.sendall(data[sent:])
            return
        super().send(data)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
            if self.peer_pid is not None:
                check_peer(sock, self.peer_pid, f"API socket {self.unix_path}")
        except (OSError, HypervisorError):
            sock.close()
            raise
        self.sock = sock


def error_message(body: bytes) -> list[str]:
    """The messages in an error body, whatever shape the server chose.

    CH's own errors are a JSON array of strings; micro_http's are ``{"error": "..."}``; anything
    else is kept as text so the operator still sees what the server said.
    """
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        return []
    try:
        parsed = json.loads(text)
    except ValueError:
        return [text]
    if isinstance(parsed, list):
        return [str(item) for item in parsed]
    if isinstance(parsed, dict):
        if "error" in parsed:
            return [str(parsed["error"])]
        return [json.dumps(parsed, sort_keys=True)]
    return [str(parsed)]


class ChApi:
    """The REST API of one VMM, reached through its ``--api-socket`` path.

    ``timeout`` bounds every ordinary request; ``slow_timeout`` bounds the endpoints marked slow
    (boot, snapshot, restore), which copy guest memory and stall the server meanwhile.
    """

    def __init__(
        self,
        path: Path,
        *,
        timeout: float = 10.0,
        slow_timeout: float = 120.0,
        peer_pid: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.slow_timeout = slow_timeout
        self.peer_pid = peer_pid  # refuse a socket that process does not serve (check_peer)

    def call(
        self, name: str, body: Mapping[str, Any] | None = None, *, fds: tuple[int, ...] = ()
    ) -> Any:
        """Send one request; return the decoded JSON for GETs, None otherwise.

        ``fds`` travel as SCM_RIGHTS ancillary data with the request (the only way CH takes
        descriptors, e.g. a TAP for ``vm.add-net``: never as numbers in the JSON); the server
        gets its own copies, the caller keeps and closes its own.

        Raises ``ChApiError`` for an error status and ``ChApiUnavailable`` when the socket does
        not answer in time.
        """
        endpoint = ENDPOINTS[name]  # a KeyError here is a driver bug: every request is listed
        if (body is None) != (endpoint.body_schema is None):
            raise TypeError(f"{name} {'takes' if endpoint.body_schema else 'takes no'} body")
        payload = b"" if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if endpoint.method == "PUT":
            # micro_http needs Content-Length, and a body-less action must say 0 (not send {}).
            headers["Content-Length"] = str(len(payload))
        if payload:
            headers["Content-Type"] = "application/json"
        timeout = self.slow_timeout if endpoint.slow else self.timeout
        conn = UnixHTTPConnection(self.path, timeout, tuple(fds), self.peer_pid)
        try:
            conn.request(endpoint.method, endpoint.path, body=payload or None, headers=headers)
            resp = conn.getresponse()
            status, data = resp.status, resp.read()
        except TimeoutError as exc:
            raise ChApiUnavailable(f"{name}: no answer from the VMM within {timeout:g}s") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise ChApiUnavailable(f"{name}: VMM API at {self.path} unreachable: {exc}") from exc
        finally:
            conn.close()
        if status not in endpoint.success:
            raise ChApiError(name, status, error_message(data))
        if not endpoint.returns_json:
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            raise HypervisorError(f"{name}: the VMM answered with invalid JSON: {exc}") from exc

    # Thin named wrappers: they keep call sites readable and typo-proof.
    def ping(self) -> dict[str, Any]:
        return dict(self.call("vmm.ping"))

    def info(self) -> dict[str, Any]:
        return dict(self.call("vm.info"))

    def counters(self) -> dict[str, Any]:
        return dict(self.call("vm.counters"))

    def action(self, name: str) -> None:
        self.call(name)
