"""The Cloud Hypervisor OpenAPI document, loaded once, with request-body validation.

Shared by the simulator (which validates every request body it receives) and the contract tests
(which validate every request the driver sends, independently of the simulator's verdict).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from openapi_schema_validator import OAS30Validator, oas30_format_checker

REPO_ROOT = Path(__file__).resolve().parents[2]
# Vendored in the repository (Apache-2.0, provenance in tests/reference/README.md), so the contract
# tests run in any clone.
REFERENCE_DIR = REPO_ROOT / "tests" / "reference"
SPEC_FILENAME = "cloud-hypervisor-openapi.yaml"
VENDORED_SPEC = REFERENCE_DIR / SPEC_FILENAME


def spec_path() -> Path:
    """``$CHSIM_SPEC`` if set (another copy under evaluation), else the vendored document."""
    return Path(os.environ.get("CHSIM_SPEC") or VENDORED_SPEC)


@dataclass(frozen=True)
class Operation:
    path: str  # without the /api/v1 prefix, e.g. "/vm.pause"
    method: str  # upper case
    body_schema: str | None  # component name of the request body, if any
    body_required: bool
    responses: frozenset[str]  # status codes as strings

    @property
    def name(self) -> str:
        return self.path.lstrip("/")


class OpenApi:
    """Routes and schemas of one OpenAPI 3.0 document."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # libyaml's loader when present: every simulated VMM start parses the document.
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        self.doc: dict[str, Any] = yaml.load(path.read_text(), Loader=loader)
        self.base_path = "/api/v1"
        self.operations: dict[tuple[str, str], Operation] = {}
        for route, item in self.doc["paths"].items():
            for method, op in item.items():
                body = op.get("requestBody")
                schema_name = None
                if body is not None:
                    ref = body["content"]["application/json"]["schema"]["$ref"]
                    schema_name = ref.rsplit("/", 1)[-1]
                self.operations[(method.upper(), route)] = Operation(
                    path=route,
                    method=method.upper(),
                    body_schema=schema_name,
                    body_required=bool(body and body.get("required")),
                    responses=frozenset(str(code) for code in op.get("responses", {})),
                )
        self._validators: dict[str, OAS30Validator] = {}

    def schemas(self) -> dict[str, Any]:
        return dict(self.doc["components"]["schemas"])

    def routes(self) -> set[str]:
        return {path for _, path in self.operations}

    def lookup(self, method: str, path: str) -> Operation | None:
        return self.operations.get((method.upper(), path))

    def methods_for(self, path: str) -> set[str]:
        return {m for m, p in self.operations if p == path}

    def validator(self, schema_name: str) -> OAS30Validator:
        if schema_name not in self._validators:
            # $refs in the document are "#/components/...": validate against a root that holds
            # the components, so they resolve exactly as written.
            root = {
                "components": self.doc["components"],
                "$ref": f"#/components/schemas/{schema_name}",
            }
            self._validators[schema_name] = OAS30Validator(
                root, format_checker=oas30_format_checker
            )
        return self._validators[schema_name]

    def errors(self, schema_name: str, instance: Any) -> list[str]:
        """Schema violations of ``instance``, as readable strings (empty when valid)."""
        return [
            f"{'/'.join(str(p) for p in err.absolute_path) or '<body>'}: {err.message}"
            for err in self.validator(schema_name).iter_errors(instance)
        ]

    def unknown_fields(self, schema_name: str, instance: Any) -> list[str]:
        """Keys the schema does not define. The v53 server silently ignores them, so a typo
        (``image-type``) is never an error there: tests use this to catch them."""
        return list(self._unknown(self._schema(schema_name), instance, ""))

    def _schema(self, name: str) -> dict[str, Any]:
        return dict(self.doc["components"]["schemas"][name])

    def _deref(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            schema = self._schema(schema["$ref"].rsplit("/", 1)[-1])
        return schema

    def _unknown(self, schema: dict[str, Any], instance: Any, where: str) -> Iterator[str]:
        schema = self._deref(schema)
        if isinstance(instance, dict) and schema.get("type", "object") == "object":
            props = schema.get("properties")
            extra = schema.get("additionalProperties")
            for key, value in instance.items():
                here = f"{where}/{key}"
                if props is not None and key in props:
                    yield from self._unknown(props[key], value, here)
                elif isinstance(extra, dict):
                    yield from self._unknown(extra, value, here)
                elif props is not None:
                    yield here
        elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
            for index, value in enumerate(instance):
                yield from self._unknown(schema["items"], value, f"{where}/{index}")


@functools.lru_cache(maxsize=4)
def load(path: Path | None = None) -> OpenApi:
    return OpenApi(path or spec_path())
