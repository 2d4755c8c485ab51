"""Exact query-count assertions that print the SQL when they differ (as Zulip's tests do).

A hot path's statements are pinned by count: a change that adds one (an extra read under the
append lock, an ORM bulk_update compiling CASE WHENs, a re-read row) fails with every statement
listed, so the reviewer sees what came in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from django.db import connection
from django.test.utils import CaptureQueriesContext

# Transaction bookkeeping, not work: savepoints of the test's own transaction and BEGIN/COMMIT
# logged on some backends.
_BOOKKEEPING = ("SAVEPOINT", "RELEASE SAVEPOINT", "ROLLBACK TO SAVEPOINT", "BEGIN", "COMMIT")


@contextlib.contextmanager
def exact_queries(count: int) -> Iterator[list[str]]:
    """Assert that the block runs exactly ``count`` statements (transaction bookkeeping aside);
    yields the list of statements, filled when the block ends."""
    statements: list[str] = []
    with CaptureQueriesContext(connection) as captured:
        yield statements
    statements.extend(
        q["sql"] for q in captured.captured_queries if not q["sql"].startswith(_BOOKKEEPING)
    )
    if len(statements) != count:
        listing = "\n".join(f"  {i}. {sql}" for i, sql in enumerate(statements, 1))
        raise AssertionError(
            f"{len(statements)} queries on {connection.vendor}, expected {count}:\n{listing}"
        )
