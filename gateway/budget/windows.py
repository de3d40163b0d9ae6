"""Calendar budget windows: a local day or a local month in the policy's time zone.

A window runs from local midnight to the next local midnight (daily) or from local midnight on the 1st
to local midnight on the 1st of the next month (monthly), so a DST day lasts 23 or 25 hours. Python
compares two datetimes of the same zone by wall time, so do arithmetic on `start_ts`/`end_ts`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

__all__ = ["Period", "Window", "WindowCache", "window_for", "seconds_until_reset"]

Period = Literal["daily", "monthly"]


@dataclass(frozen=True)
class Window:
    """One calendar window; `id` ("d2026-11-22", "m2026-11") is part of every counter key."""

    id: str
    start: datetime
    end: datetime
    start_ts: float = field(init=False, repr=False, compare=False)   # start as seconds since the epoch
    end_ts: float = field(init=False, repr=False, compare=False)     # end (exclusive) as epoch seconds

    def __post_init__(self) -> None:
        object.__setattr__(self, "start_ts", self.start.timestamp())
        object.__setattr__(self, "end_ts", self.end.timestamp())


class WindowCache:
    """`window_for`, remembered per period and time zone while `now` stays within the window."""

    def __init__(self) -> None:
        self._windows: dict[tuple[Period, str], Window] = {}

    def window_for(self, period: Period, tz: str, now: float) -> Window:
        """The `period` window of `tz` that holds `now`, computed again only once `now` has left it."""
        window = self._windows.get((period, tz))
        if window is None or not window.start_ts <= now < window.end_ts:
            window = self._windows[(period, tz)] = window_for(period, tz, now)
        return window


def window_for(period: Period, tz: str, now: float) -> Window:
    """The `period` window of time zone `tz` that contains the instant `now` (epoch seconds)."""
    zone = ZoneInfo(tz)
    today = datetime.fromtimestamp(now, zone).date()
    if period == "daily":
        tomorrow = today + timedelta(days=1)
        return Window(f"d{today.isoformat()}", _midnight(today, zone), _midnight(tomorrow, zone))
    if period == "monthly":
        first = today.replace(day=1)
        return Window(f"m{first:%Y-%m}", _midnight(first, zone), _midnight(_next_month(first), zone))
    raise ValueError(f"unknown budget period {period!r}; expected 'daily' or 'monthly'")


def seconds_until_reset(window: Window, now: float) -> int:
    """Whole seconds until `window` ends, rounded up and at least 1 (for Retry-After)."""
    return max(1, math.ceil(window.end_ts - now))


def _midnight(day: date, zone: ZoneInfo) -> datetime:
    """The first instant of `day` in `zone` (if midnight is skipped by DST, the instant clocks jump)."""
    return datetime(day.year, day.month, day.day, tzinfo=zone)


def _next_month(first: date) -> date:
    """The 1st of the month after the month starting at `first`."""
    return date(first.year + first.month // 12, first.month % 12 + 1, 1)
