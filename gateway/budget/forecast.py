"""Where a budget window is heading: burn rates, the spend projected at its reset, when it runs out.

All in the window's unit. `burn_per_hour` is the rate of the last hour (of the window's time so far, when
it started less than an hour ago); `burn_per_hour_window` the average since the window started. The
projection and the exhaustion time both follow the current rate (`burn_per_hour`): spent + rate x the
hours left, and the moment spent + rate x t reaches the limit (null when that is not before the reset;
now when the window is already spent).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from gateway.budget.burn import HOUR_S

__all__ = ["Forecast", "forecast"]


@dataclass(frozen=True)
class Forecast:
    """A window's forecast in its unit (nano-USD, tokens or requests); times in epoch seconds."""

    burn_per_hour: float
    burn_per_hour_window: float
    projected_at_reset: float
    exhausted_at: float | None

    def exhausted_iso(self) -> str | None:
        """`exhausted_at` as ISO 8601 (UTC), or None."""
        if self.exhausted_at is None:
            return None
        return datetime.fromtimestamp(self.exhausted_at, timezone.utc).isoformat()


def forecast(spent: int, limit: int, start: float, end: float, now: float, last_hour: int) -> Forecast:
    """The forecast of a window [start, end) that has `spent` of `limit` at `now`, `last_hour` of it in the
    last hour (or since `start`, when that is nearer)."""
    elapsed = max(0.0, now - start)
    burn_window = spent * HOUR_S / elapsed if elapsed > 0 else 0.0
    span = min(HOUR_S, elapsed)
    burn = last_hour * HOUR_S / span if span > 0 else 0.0
    left = max(0.0, end - now)
    projected = spent + burn * left / HOUR_S
    if spent >= limit:
        exhausted: float | None = now
    elif burn > 0 and (limit - spent) * HOUR_S / burn < left:
        exhausted = now + (limit - spent) * HOUR_S / burn
    else:
        exhausted = None
    return Forecast(burn, burn_window, projected, exhausted)
