"""List plumbing for the API: a count that rides along with the page, and filters that cost
nothing when a request gives none."""

from __future__ import annotations

from typing import Any

from django.db.models import Count, IntegerField, QuerySet, Subquery, Value
from django_filters.rest_framework import DjangoFilterBackend
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import LimitOffsetPagination

TOTAL = "pagination_total_count"


def with_total(queryset: QuerySet[Any]) -> QuerySet[Any]:
    """``queryset`` with each row carrying the number of rows it has before any slicing (as
    ``TOTAL``), a scalar subquery that PostgreSQL runs once."""
    total = queryset.order_by().annotate(_one=Value(1)).values("_one").annotate(n=Count("*"))
    return queryset.annotate(**{TOTAL: Subquery(total.values("n"), output_field=IntegerField())})


# Pages hold at most this many rows; offsets stay far inside a 64-bit integer with any limit.
MAX_LIMIT = 1000
MAX_OFFSET = 2**62


def _bounded(name: str, raw: str, low: int, high: int | None) -> int:
    """``raw`` as an integer in [low, high], else a 400 naming the parameter."""
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        upper = f" and {high}" if high is not None else ""
        raise ValidationError({name: [f"Must be an integer between {low}{upper}."]})
    return value


class Pagination(LimitOffsetPagination):
    """``?limit=&offset=`` with ``count``, read in the page's own query.

    The page's rows carry the count as a scalar subquery (PostgreSQL runs it once), so a page
    is one query instead of DRF's two; a window ``COUNT(*) OVER ()`` would instead make the
    database sort every matching row. A page past the end has no row to carry the count: it is
    then asked for on its own, as DRF does. DISTINCT and grouped queries keep DRF's path.

    Unlike DRF, a ``limit`` or ``offset`` that is not an integer in range is refused (400)
    instead of silently replaced: an offset past a 64-bit integer reached the database and
    failed there. A limit above ``MAX_LIMIT`` is lowered to it, as DRF does.
    """

    max_limit = MAX_LIMIT

    def get_limit(self, request: Any) -> int | None:
        raw = request.query_params.get(self.limit_query_param)
        if raw is None:
            return self.default_limit
        return min(_bounded(self.limit_query_param, raw, 1, None), MAX_LIMIT)

    def get_offset(self, request: Any) -> int:
        raw = request.query_params.get(self.offset_query_param)
        if raw is None:
            return 0
        return _bounded(self.offset_query_param, raw, 0, MAX_OFFSET)

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        bounds = {
            self.limit_query_param: {"minimum": 1, "maximum": MAX_LIMIT},
            self.offset_query_param: {"minimum": 0, "maximum": MAX_OFFSET},
        }
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            parameter["schema"].update(bounds.get(parameter["name"], {}))
        return parameters

    def paginate_queryset(self, queryset: Any, request: Any, view: Any = None) -> list[Any] | None:
        if not isinstance(queryset, QuerySet) or queryset.query.distinct or queryset.query.group_by:
            return super().paginate_queryset(queryset, request, view)
        self.request = request
        self.limit = self.get_limit(request)
        if self.limit is None:
            return None
        self.offset = self.get_offset(request)
        rows = list(with_total(queryset)[self.offset : self.offset + self.limit])
        self.count = getattr(rows[0], TOTAL) if rows else queryset.count()
        if self.count > self.limit and self.template is not None:
            self.display_page_controls = True
        return rows


# Parameters that are never filters: a request with no other skips the filter form.
NOT_FILTERS = frozenset({"limit", "offset", "format"})


class FilterBackend(DjangoFilterBackend):
    """django-filter, skipped when a request's only parameters are pagination ones.

    Building and validating the filter form is a good part of a list request's CPU; with no
    filter parameter it would return the queryset unchanged anyway.
    """

    def filter_queryset(self, request: Any, queryset: Any, view: Any) -> Any:
        if NOT_FILTERS.issuperset(request.query_params):
            return queryset
        return super().filter_queryset(request, queryset, view)
