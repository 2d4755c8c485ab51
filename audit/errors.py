"""Errors of the event store."""

from __future__ import annotations


class EventStoreError(Exception):
    """Base class of event store errors."""


class EventStoreUnavailable(EventStoreError):
    """The store cannot take an event now (database down, lock timeout): refuse the action."""


class ConcurrencyError(EventStoreError):
    """A stale writer: the aggregate moved on since the caller read it."""

    def __init__(
        self, aggregate_type: str, aggregate_id: str, expected_version: int, current_version: int
    ) -> None:
        self.aggregate_type = aggregate_type
        self.aggregate_id = aggregate_id
        self.expected_version = expected_version
        self.current_version = current_version
        super().__init__(
            f"{aggregate_type} {aggregate_id} is at version {current_version}, "
            f"not {expected_version}: reload and try again"
        )


class InvalidEvent(EventStoreError):
    """The event is not fit to be recorded (unknown type, data not canonical JSON)."""
