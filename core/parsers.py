"""JSON request bodies with a nesting limit.

The standard library's decoder recurses once per level: a body of 100,000 ``[`` raised a
RecursionError that became a 500. No request of this API nests more than a few levels, so any
body nested deeper than ``MAX_DEPTH`` is refused with a 400 before a view sees it.
"""

from __future__ import annotations

import codecs
import json
from typing import Any

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser, get_encoding
from rest_framework.utils.json import strict_constant

__all__ = ["MAX_DEPTH", "DepthLimitedJSONParser", "loads"]

MAX_DEPTH = 32


def depth(value: Any) -> int:
    """How deeply ``value`` nests lists and objects (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def loads(text: str | bytes, max_depth: int = MAX_DEPTH, **kwargs: Any) -> Any:
    """``json.loads`` that raises ValueError, never RecursionError, for a body nested too deep."""
    try:
        value = json.loads(text, **kwargs)
    except RecursionError:
        raise ValueError(f"JSON nested more than {max_depth} levels deep") from None
    if depth(value) > max_depth:
        raise ValueError(f"JSON nested more than {max_depth} levels deep")
    return value


class DepthLimitedJSONParser(JSONParser):
    """DRF's JSON parser, refusing bodies nested deeper than ``MAX_DEPTH`` with a 400."""

    def parse(self, stream: Any, media_type: Any = None, parser_context: Any = None) -> Any:
        encoding = get_encoding(parser_context or {})
        try:
            text = codecs.getreader(encoding)(stream).read()
            return loads(text, parse_constant=strict_constant if self.strict else None)
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
