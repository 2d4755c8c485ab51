"""``parse``: ``ast.parse`` for the tests that read the product's source.

CPython 3.11's AST builder keeps its recursion depth counter per interpreter, not per thread, so
a parse in the test's thread can fail with the spurious "AST constructor recursion depth
mismatch" while another thread builds an AST at the same moment (a traceback being formatted
parses its source line; CPython gh-106905). The parse is simply tried again.
"""

from __future__ import annotations

import ast


def parse(source: str) -> ast.Module:
    error: SystemError | None = None
    for _ in range(4):
        try:
            return ast.parse(source)
        except SystemError as exc:
            if "recursion depth mismatch" not in str(exc):
                raise
            error = exc
    assert error is not None
    raise error
