"""Typed errors, built from the API's error bodies (``{"detail": ...}`` plus what each kind adds:
the named quota of a refusal, the current state of a conflict)."""

from __future__ import annotations

from typing import Any


class SandboxError(Exception):
    """Any error of the SDK; ``status`` is the HTTP status when the server answered."""

    def __init__(self, message: str, *, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body


class AuthError(SandboxError):
    """No token, or the server does not accept it (401)."""


class Forbidden(SandboxError):
    """The caller may not do this (403)."""


class QuotaExceeded(Forbidden):
    """A named quota refuses the request (403 with ``quota``)."""

    def __init__(self, message: str, *, status: int | None = None, body: Any = None) -> None:
        super().__init__(message, status=status, body=body)
        body = body if isinstance(body, dict) else {}
        self.quota: str | None = body.get("quota")
        self.scope: str | None = body.get("scope")
        # A team budget's refusal (scope "group"): the group whose shared quota it is.
        self.group: str | None = body.get("group")
        # The hosts' capacity's refusal (scope "host"): the host, None for the whole cluster.
        self.host: str | None = body.get("host")
        self.limit: int | None = body.get("limit")
        self.used: int | None = body.get("used")
        self.requested: int | None = body.get("requested")


class NotFound(SandboxError):
    """No such VM, snapshot, request or file, or one the caller cannot see (404)."""


class Conflict(SandboxError):
    """The VM's current state does not allow this (409), or another request is in flight."""

    def __init__(self, message: str, *, status: int | None = None, body: Any = None) -> None:
        super().__init__(message, status=status, body=body)
        body = body if isinstance(body, dict) else {}
        self.state: str | None = body.get("state")
        self.pending: str | None = body.get("pending")
        self.allowed_states: list[str] = list(body.get("allowed_states") or [])


class BadRequest(SandboxError):
    """The server refused the input (400, 413); ``body`` holds the field errors."""


class TooLarge(SandboxError):
    """More bytes than the caller allowed itself (``size`` of them, ``limit`` allowed): the
    client stopped reading, or sent nothing."""

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class Unavailable(SandboxError):
    """The server, its audit log or the guest cannot take the request now (503), or the server
    cannot be reached."""


class GuestError(SandboxError):
    """The guest agent refused (502) or timed out (504)."""


class RequestFailed(SandboxError):
    """The worker carried a request out and it failed (its outcome is a ``*_failed`` event)."""

    def __init__(self, message: str, *, outcome: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome or {}


class WaitTimeout(SandboxError):
    """A request was still pending when the wait's timeout ran out (it may still complete)."""


class ChecksumMismatch(SandboxError):
    """The SHA-256 the server reports is not that of the bytes sent or received."""


def _detail(body: Any) -> str:
    if isinstance(body, dict):
        detail = body.get("detail")
        if isinstance(detail, str):
            return detail
        if detail is not None:
            return str(detail)
        parts = []
        for key, value in body.items():
            text = "; ".join(map(str, value)) if isinstance(value, list) else str(value)
            parts.append(f"{key}: {text}")
        return ", ".join(parts) or "error"
    if isinstance(body, list):
        return "; ".join(map(str, body))
    return str(body) if body else "error"


def error_from(status: int, body: Any) -> SandboxError:
    """The typed error of an API answer with an error status."""
    detail = _detail(body)
    kind: type[SandboxError]
    if status == 401:
        kind = AuthError
    elif status == 403:
        kind = QuotaExceeded if isinstance(body, dict) and "quota" in body else Forbidden
    elif status == 404:
        kind = NotFound
    elif status == 409:
        kind = Conflict
        if isinstance(body, dict) and body.get("state"):
            detail = f"{detail} (state: {body['state']})"
    elif status in (400, 413, 415):
        kind = BadRequest
    elif status == 503:
        kind = Unavailable
    elif status in (502, 504):
        kind = GuestError
    else:
        kind = SandboxError
    return kind(f"{status}: {detail}", status=status, body=body)
