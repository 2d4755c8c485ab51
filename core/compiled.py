"""Querysets compiled once and run many times with other values.

Django builds and compiles a queryset's SQL on every run; for the API's hottest reads (a page of
VMs, one VM) that took more CPU than the database spent answering. A ``CompiledQuery`` compiles
a ``values()`` queryset once, built with stand-in values (sentinels) where a request's values
go, remembers which parameters they became, and then runs the same SQL with the request's
values in their place, converting the columns as the ORM would. The SQL is the ORM's own, so it
follows the models; a cache holds one per shape (LIMIT and OFFSET are part of the SQL text).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from django.db import connections
from django.db.models import QuerySet


class CompiledQuery:
    def __init__(self, queryset: QuerySet[Any], stand_ins: dict[str, Any]) -> None:
        if queryset._fields is None or queryset._iterable_class.__name__ != "ValuesIterable":  # type: ignore[attr-defined]
            raise TypeError("CompiledQuery takes a values() queryset")
        self.alias = queryset.db
        compiler = queryset.query.get_compiler(self.alias)
        sql, params = compiler.as_sql()
        self.sql = sql
        self.params = list(params)
        forms = {name: _forms(value) for name, value in stand_ins.items()}
        self.slots = [
            (i, name)
            for i, param in enumerate(self.params)
            for name, candidates in forms.items()
            if any(param == c and _same_kind(param, c) for c in candidates)
        ]
        missing = set(stand_ins) - {name for _, name in self.slots}
        if missing:
            raise ValueError(f"stand-ins not found in the compiled parameters: {sorted(missing)}")
        query = queryset.query
        # As Django's ValuesIterable names them.
        self.names = [*query.extra_select, *query.values_select, *query.annotation_select]
        by_index = compiler.get_converters([col for col, _, _ in compiler.select])
        self.converters = [by_index.get(i, ([], None)) for i in range(len(compiler.select))]

    def run(self, **values: Any) -> list[dict[str, Any]]:
        params = list(self.params)
        for index, name in self.slots:
            params[index] = _as_param(values[name], self.params[index])
        connection = connections[self.alias]
        with connection.cursor() as cursor:
            cursor.execute(self.sql, params)
            rows = cursor.fetchall()
        names, converters = self.names, self.converters
        out = []
        for row in rows:
            item = {}
            for name, value, (convs, expression) in zip(names, row, converters, strict=True):
                for convert in convs:
                    value = convert(value, expression, connection)
                item[name] = value
            out.append(item)
        return out


def _forms(value: Any) -> list[Any]:
    """How a stand-in can appear among compiled parameters (a UUID as itself or as hex)."""
    if isinstance(value, uuid.UUID):
        return [value, value.hex, str(value)]
    return [value]


def _same_kind(param: Any, stand_in: Any) -> bool:
    """A compiled parameter is the stand-in itself, or an int the database adapter wrapped
    (psycopg passes a BigIntegerField's value as its ``Int8``, an int subclass)."""
    if type(param) is type(stand_in):
        return True
    return type(stand_in) is int and isinstance(param, int) and not isinstance(param, bool)


def _as_param(value: Any, stand_in_param: Any) -> Any:
    """A request's value in the form its stand-in took (a UUID's hex on SQLite)."""
    if isinstance(value, uuid.UUID) and isinstance(stand_in_param, str):
        return value.hex if len(stand_in_param) == 32 else str(value)
    return value


def cached(builder: Callable[..., CompiledQuery]) -> Callable[..., CompiledQuery]:
    """``builder(*shape)``, compiled once per shape (a process uses one database)."""
    return lru_cache(maxsize=256)(builder)
