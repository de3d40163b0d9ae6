"""How long an upstream asked us to wait: `retry-after-ms`, then `Retry-After` (seconds or HTTP date)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import timezone
from email.utils import parsedate_to_datetime

__all__ = ["retry_after_seconds"]


def retry_after_seconds(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to wait from epoch time `now`, never negative; None when no usable header is present."""
    millis = _number(_header(headers, "retry-after-ms"))
    if millis is not None:
        return max(0.0, millis / 1000.0)
    value = _header(headers, "retry-after")
    if value is None:
        return None
    seconds = _number(value)
    if seconds is None:
        seconds = _seconds_until_date(value, now)
    return None if seconds is None else max(0.0, seconds)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """The value of header `name` (lower case), looked up case-insensitively."""
    value = headers.get(name)
    if value is not None:
        return value
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def _number(value: str | None) -> float | None:
    """`value` as a finite number, or None."""
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _seconds_until_date(value: str, now: float) -> float | None:
    """Seconds from `now` to the HTTP date `value` (naive dates are UTC), or None if it is no date."""
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp() - now
