"""How the domain's errors answer over HTTP: one mapping for the REST API's exception handler
(``sandbox_site.api``) and the dashboard's JSON views (the exec box), so a failure gets the same
status and the same words wherever it is asked for.

400 with field errors for bad input, 403 with the named quota on a quota refusal, 404, 409 with
the current state or version on a conflict, 503 when the audit log or a guest cannot be reached,
504 when the guest agent timed out and 502 when it refused. A guest path the agent refuses (a
directory, a missing parent) is the caller's error: 400 (404 for a missing file) with the
agent's code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.core.exceptions import PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import UnreadablePostError

from audit.digests import ChainBroken
from audit.errors import ConcurrencyError, EventStoreUnavailable
from vms.agent.client import AgentError, AgentTimeout
from vms.commands import InvalidState, NotFound
from vms.guest import GuestUnavailable
from vms.quotas import QuotaExceeded

__all__ = ["AGENT_PATH_ERRORS", "ErrorAnswer", "answer_for"]

# Agent error codes that say what is wrong with the caller's path (docs/agent-protocol.md).
AGENT_PATH_ERRORS = frozenset(
    {"bad_request", "exists", "not_a_directory", "is_a_directory", "not_a_file"}
)


@dataclass(frozen=True)
class ErrorAnswer:
    """An HTTP status and a JSON body; ``message`` is the body as one line of text."""

    status: int
    body: dict[str, Any]

    @property
    def message(self) -> str:
        detail = self.body.get("detail")
        if isinstance(detail, str):
            return detail
        parts = []
        for key, value in self.body.items():
            text = " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
            parts.append(text if key == "detail" else f"{key}: {text}")
        return "; ".join(parts)


def _validation_body(exc: DjangoValidationError) -> dict[str, Any]:
    if hasattr(exc, "error_dict"):
        return dict(exc.message_dict)
    return {"detail": exc.messages}


def answer_for(exc: BaseException, *, permission: bool = True) -> ErrorAnswer | None:
    """The answer to ``exc``, or None for an error that is not the domain's (a bug: 500).

    ``permission=False`` leaves Django's ``PermissionDenied`` to the caller (DRF words its own
    403)."""
    if isinstance(exc, EventStoreUnavailable):
        return ErrorAnswer(
            503, {"detail": "The audit log cannot record this action now; nothing was done."}
        )
    if isinstance(exc, ChainBroken):
        # Signing or exporting over a broken chain is refused (and recorded by the command).
        return ErrorAnswer(409, {"detail": f"the audit chain is broken: {exc}"})
    if isinstance(exc, ConcurrencyError):
        return ErrorAnswer(
            409,
            {
                "detail": str(exc),
                "aggregate": f"{exc.aggregate_type}:{exc.aggregate_id}",
                "expected_version": exc.expected_version,
                "current_version": exc.current_version,
            },
        )
    if isinstance(exc, DjangoValidationError):
        return ErrorAnswer(400, _validation_body(exc))
    if isinstance(exc, UnreadablePostError):
        # The body ended before its announced length (the client went away): nothing was done.
        detail = f"the request body is incomplete ({exc}); nothing was done"
        return ErrorAnswer(400, {"detail": detail})
    if isinstance(exc, NotFound):
        return ErrorAnswer(404, {"detail": str(exc)})
    if isinstance(exc, InvalidState):
        return ErrorAnswer(
            409,
            {
                "detail": str(exc),
                "state": exc.vm.state,
                "pending": exc.vm.pending_type or None,
                "allowed_states": sorted(exc.allowed),
                "version": exc.vm.version,
            },
        )
    if isinstance(exc, QuotaExceeded):
        return ErrorAnswer(403, exc.as_dict())
    if isinstance(exc, GuestUnavailable):
        return ErrorAnswer(503, {"detail": str(exc)})
    if isinstance(exc, AgentTimeout):
        return ErrorAnswer(504, {"detail": f"the guest agent timed out: {exc}"})
    if isinstance(exc, AgentError) and exc.code in AGENT_PATH_ERRORS | {"not_found"}:
        return ErrorAnswer(
            404 if exc.code == "not_found" else 400,
            {"detail": f"the guest refused the path: {exc.message}", "code": exc.code},
        )
    if isinstance(exc, AgentError):
        return ErrorAnswer(502, {"detail": f"the guest agent refused: {exc}"})
    if permission and isinstance(exc, PermissionDenied):
        return ErrorAnswer(403, {"detail": str(exc) or "You may not do this."})
    return None
