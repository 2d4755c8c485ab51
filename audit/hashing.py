"""The canonical encoding of an event and its chain hash.

The hash covers every recorded field except ``position``: order is proven by the chain itself
(each hash covers the previous one), so a verifier re-derives positions from the links and can
tell a reordered row from an altered one. ``data`` is stored as the exact canonical JSON text
that was hashed, so verification needs no re-encoding.

The hashed bytes are the UTF-8 encoding of

    <prev_hash> LF <header> LF <data>

where ``header`` is a JSON array of the HASHED_FIELDS values as strings (an integer in decimal,
a time as ``format_time`` renders it, a missing value as ""), written without whitespace and
with non-ASCII characters as they are; docs/event-store.md gives the rule and test vectors.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import Any

__all__ = [
    "EVENT_COLUMNS",
    "GENESIS_HASH",
    "HASHED_FIELDS",
    "canonical_json",
    "check_data",
    "event_hash",
    "format_time",
    "hash_input",
    "hash_parts",
    "render_fields",
]

GENESIS_HASH = "0" * 64

# Every stored column of an event, in table order: the store's SQL, exports and the offline
# verifier (which must not import Django) all read this one list.
EVENT_COLUMNS = (
    "position",
    "event_id",
    "aggregate_type",
    "aggregate_id",
    "version",
    "type",
    "schema_version",
    "data",
    "actor_type",
    "actor_id",
    "actor_name",
    "token_id",
    "channel",
    "source_ip",
    "request_id",
    "correlation_id",
    "causation_id",
    "recorded_at",
    "prev_hash",
    "hash",
)

# Every column but ``position`` (order is proven by the links), ``data`` (appended verbatim) and
# the two hashes, in column order.
HASHED_FIELDS = tuple(
    c for c in EVENT_COLUMNS if c not in ("position", "data", "prev_hash", "hash")
)


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 text; NaN and infinities are refused."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def format_time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _check_json(value: Any, path: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path}: {value} is not valid JSON")
    if isinstance(value, str) and "\x00" in value:
        raise ValueError(f"{path}: NUL characters cannot be stored")
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{path}: keys must be strings, got {k!r}")
            _check_json(v, f"{path}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_json(v, f"{path}[{i}]")
    elif not isinstance(value, str | int | float | bool | type(None)):
        raise ValueError(f"{path}: {type(value).__name__} is not JSON")


def check_data(data: Any) -> str:
    """Validate event data and return its canonical JSON text."""
    if not isinstance(data, Mapping):
        raise ValueError("event data must be a JSON object")
    _check_json(data, "data")
    return canonical_json(data)


def render_fields(fields: Mapping[str, Any]) -> list[str]:
    """The HASHED_FIELDS values of ``fields`` as the strings the header holds, in order."""
    parts = []
    for name in HASHED_FIELDS:
        value = fields[name]
        if isinstance(value, datetime):
            value = format_time(value)
        parts.append("" if value is None else str(value))
    return parts


def event_hash(fields: Mapping[str, Any], data_json: str, prev_hash: str) -> str:
    return hash_parts(render_fields(fields), data_json, prev_hash)


def hash_input(parts: Sequence[str], data_json: str, prev_hash: str) -> bytes:
    """The bytes that are hashed, from the HASHED_FIELDS values already rendered as strings.

    The header is ``json.dumps(parts, ensure_ascii=False, separators=(",", ":"))`` for a list of
    strings, built from the JSON string escaper directly: the verifiers' hot loops call this.
    """
    header = ",".join(map(encode_basestring, parts))
    return f"{prev_hash}\n[{header}]\n{data_json}".encode()


def hash_parts(parts: Sequence[str], data_json: str, prev_hash: str) -> str:
    """The hash from the HASHED_FIELDS values already rendered as strings, in order."""
    return hashlib.sha256(hash_input(parts, data_json, prev_hash)).hexdigest()
