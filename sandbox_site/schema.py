"""What the OpenAPI schema says beyond what drf-spectacular infers from the views.

- The Bearer token (``Authorization: Bearer sbx_<key>_<secret>``, accounts/tokens.py) as a
  security scheme beside the session cookie, so clients generated from the schema can use it.
- The error answers every operation can give, with their body shape (``Error``: ``detail``
  plus, for some, the current state or the named quota; ``ValidationError``: field errors):
  400 bad input, 401 no or bad credentials, 403 refused (role, token limits, quota), 404 for a
  path naming something the caller cannot see, 409 a conflict with the current state (a VM's
  state, the log's version, a broken audit chain, an export not ready), 503 when the audit log
  cannot record an action (writes fail closed).
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension

__all__ = ["TokenAuthenticationScheme", "add_error_responses"]


class TokenAuthenticationScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    target_class = "accounts.authentication.TokenAuthentication"
    name = "tokenAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "sbx_<key>_<secret>",
            "description": "An API token (`manage.py create_token`, the dashboard, or "
            "POST /api/v1/tokens/), sent as `Authorization: Bearer <token>`.",
        }


ERROR = {
    "type": "object",
    "description": "An error: `detail` says what went wrong. A conflict (409) adds the current "
    "state or version, a quota refusal (403) the quota, its limit and usage.",
    "properties": {"detail": {"type": "string"}},
    "required": ["detail"],
    "additionalProperties": True,
}
VALIDATION_ERROR = {
    "type": "object",
    "description": "Bad input: each offending field (or parameter, or `non_field_errors`) "
    "with its messages; nothing was changed.",
    "additionalProperties": {
        "anyOf": [
            {"type": "array", "items": {}},
            {"type": "object"},
            {"type": "string"},
        ]
    },
}
_REF = "#/components/schemas/"
DESCRIPTIONS = {
    "400": ("Bad input; nothing was changed.", {"anyOf": [
        {"$ref": _REF + "Error"}, {"$ref": _REF + "ValidationError"}]}),
    "401": ("No credentials, or bad, expired or revoked ones.", {"$ref": _REF + "Error"}),
    "403": ("Not allowed: role, token limits (read-only, scopes, addresses) or a quota.",
            {"$ref": _REF + "Error"}),
    "404": ("Not found, or not visible to the caller.", {"$ref": _REF + "Error"}),
    "409": ("Conflict: the object's state or version does not allow this now.",
            {"$ref": _REF + "Error"}),
    "503": ("The audit log cannot record this action now; nothing was done.",
            {"$ref": _REF + "Error"}),
}  # fmt: skip
WRITES = frozenset({"post", "put", "patch", "delete"})


def _errors_for(method: str, operation: dict[str, Any], path_has_params: bool) -> list[str]:
    codes = ["401", "403"]
    if method in WRITES or operation.get("parameters") or operation.get("requestBody"):
        codes.append("400")
    if path_has_params:
        codes.append("404")
    if method in WRITES or path_has_params:
        codes.append("409")  # e.g. a download of an export that failed
    if method in WRITES:
        codes.append("503")
    return codes


def add_error_responses(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: the error answers on every operation (those an
    operation declares itself are kept), and the error schemas they refer to."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("Error", ERROR)
    schemas.setdefault("ValidationError", VALIDATION_ERROR)
    for path, operations in result.get("paths", {}).items():
        for method, operation in operations.items():
            if method not in {"get", "post", "put", "patch", "delete", "head", "options"}:
                continue
            responses = operation.setdefault("responses", {})
            for code in _errors_for(method, operation, "{" in path):
                description, schema = DESCRIPTIONS[code]
                responses.setdefault(
                    code,
                    {
                        "description": description,
                        "content": {"application/json": {"schema": schema}},
                    },
                )
    return result
