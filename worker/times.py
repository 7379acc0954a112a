"""Times in the ledger are integer microseconds since the Unix epoch, UTC: exact and sortable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["from_micros", "to_micros"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)


def to_micros(value: datetime) -> int:
    """Exact (float timestamps would round); `value` must be timezone-aware."""
    return (value - _EPOCH) // _MICRO


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)
