"""Injectable time sources: wall time for budget windows, monotonic time for durations."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "SystemClock", "FakeClock"]


class Clock(Protocol):
    """Where the gateway reads time; tests inject a FakeClock."""

    def now(self) -> float:
        """Seconds since the epoch (UTC)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""


class SystemClock:
    """The real clock (the time functions themselves: a read costs no Python call)."""

    now = staticmethod(time.time)
    monotonic = staticmethod(time.monotonic)


class FakeClock:
    """A clock that moves only when a test says so."""

    def __init__(self, now: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self._now = now
        self._mono = 1000.0

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        """Move both clocks forward."""
        self._now += seconds
        self._mono += seconds

    def set(self, now: float) -> None:
        """Jump wall time (monotonic time follows the same delta, never backwards)."""
        self._mono += max(0.0, now - self._now)
        self._now = now
