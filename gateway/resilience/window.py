"""A time-based sliding window of call outcomes, kept apart from the breaker that reads it."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = ["SlidingWindow"]


@dataclass
class _Bucket:
    """Outcomes recorded during one whole second."""

    second: int
    calls: int = 0
    failures: int = 0


class SlidingWindow:
    """Success/failure counts in 1-second buckets over the last `window_s` seconds.

    `now` is a monotonic reading. A bucket lives while its second is within the last
    ceil(window_s) seconds, so the window spans between ceil(window_s) - 1 and ceil(window_s)
    seconds. Running totals make `record` and `counts` O(1) amortised: each bucket is
    appended once and evicted once. Time must not go backwards.
    """

    def __init__(self, window_s: float) -> None:
        if not window_s > 0 or not math.isfinite(window_s):
            raise ValueError(f"window_s must be a positive number of seconds, got {window_s!r}")
        self._span = math.ceil(window_s)
        self._buckets: deque[_Bucket] = deque()
        self._calls = 0
        self._failures = 0

    def record(self, ok: bool, now: float) -> None:
        """Count one outcome at monotonic time `now`."""
        second = math.floor(now)
        buckets = self._buckets
        if buckets and buckets[-1].second == second:
            bucket = buckets[-1]             # the common case: nothing to evict within the same second
        else:
            self._evict(now)
            bucket = self._bucket_for(second)
        bucket.calls += 1
        self._calls += 1
        if not ok:
            bucket.failures += 1
            self._failures += 1

    def counts(self, now: float) -> tuple[int, int]:
        """(calls, failures) recorded within the window ending at `now`."""
        self._evict(now)
        return self._calls, self._failures

    def failure_rate(self, now: float) -> float:
        """Share of calls in the window that failed; 0.0 when there were none."""
        calls, failures = self.counts(now)
        return failures / calls if calls else 0.0

    def clear(self) -> None:
        """Forget every outcome."""
        self._buckets.clear()
        self._calls = 0
        self._failures = 0

    def _bucket_for(self, second: int) -> _Bucket:
        """The bucket of `second`, appended when it is new."""
        if not self._buckets or self._buckets[-1].second < second:
            self._buckets.append(_Bucket(second))
        return self._buckets[-1]

    def _evict(self, now: float) -> None:
        """Drop buckets that slid out of the window."""
        oldest_kept = math.floor(now) - self._span + 1
        while self._buckets and self._buckets[0].second < oldest_kept:
            gone = self._buckets.popleft()
            self._calls -= gone.calls
            self._failures -= gone.failures
