"""Retries within one provider, built in one place (`build_retrying`) from small tenacity parts.

The caller raises these around its aiohttp call so the policy can decide:

    Exception
     ├── RetryableStatus        the upstream answered 429 or 5xx: retried when the status is one of
     │                          `statuses`, otherwise the caller fails over at once
     └── UpstreamConnectError   connecting or reading the head failed, or timed out

Only the part of a call before the first byte goes to the client may be retried: once a byte has
been streamed, a retry would duplicate output, so the caller wraps only that part. An open breaker is
not retried here either; the caller fails over to the next provider.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping

from tenacity import (
    AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter,
)
from tenacity.retry import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from gateway.clock import Clock
from gateway.config.model import RetryConfig
from gateway.resilience.retry_after import retry_after_seconds

__all__ = [
    "RetryableStatus", "UpstreamConnectError", "RetryBudget", "build_retrying",
    "retry_if_status", "wait_max", "wait_retry_after", "stop_at_deadline", "stop_unless_budget",
]

_EPSILON = 1e-9  # float deposits of `ratio` must add up to whole tokens


class RetryableStatus(Exception):
    """An upstream error answer (429, 5xx) to retry or fail over from: its status, headers and body.

    A redirect (3xx) is kept as one too, as a request's last error, but never retried (dispatch).
    """

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes = b"") -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.headers = headers
        self.body = body

    def retry_after(self, now: float) -> float | None:
        """Seconds the upstream asked us to wait (from epoch time `now`), or None."""
        return retry_after_seconds(self.headers, now)


class UpstreamConnectError(Exception):
    """The upstream could not be reached or did not answer in time; the cause is chained."""


class RetryBudget:
    """One provider's retry allowance: about `ratio` retries per request, plus `floor`.

    A token bucket refilled by requests. It starts with `floor` tokens. `start()` counts a
    request in flight and deposits `ratio` tokens; `try_spend()` takes one whole token per retry
    and refuses when less than one is left; `finish()` ends the request. The bucket never holds
    more than max(floor, ratio * requests in flight) (clipped on start and finish), so quiet or
    healthy periods cannot bank retries for a later storm.

    So N requests starting from a quiet bucket retry at most floor + ratio * N times, whatever
    their interleaving: 200 requests against an always-429 upstream make at most
    200 * (1 + ratio) + floor attempts. A lone request can retry `floor` times when the bucket is
    full; right after a storm it is empty and refills by `ratio` per new request.
    """

    def __init__(self, ratio: float, floor: int) -> None:
        if not (math.isfinite(ratio) and ratio >= 0 and floor >= 0):
            raise ValueError(f"retry budget needs ratio >= 0 and floor >= 0, got {ratio!r}, {floor!r}")
        self._ratio = ratio
        self._floor = floor
        self._tokens = float(floor)
        self._in_flight = 0

    @property
    def tokens(self) -> float:
        """Retries currently affordable (fractional while refilling)."""
        return self._tokens

    @property
    def in_flight(self) -> int:
        """Requests started and not yet finished."""
        return self._in_flight

    def start(self) -> None:
        """A request begins on this provider: deposit `ratio` tokens."""
        self._in_flight += 1
        self._tokens = min(self._capacity(), self._tokens + self._ratio)

    def finish(self) -> None:
        """A request ended on this provider (call it in a `finally`)."""
        self._in_flight = max(0, self._in_flight - 1)
        self._tokens = min(self._capacity(), self._tokens)

    def try_spend(self) -> bool:
        """Take one token for a retry; False when the budget cannot afford it."""
        if self._tokens < 1.0 - _EPSILON:
            return False
        self._tokens = max(0.0, self._tokens - 1.0)
        return True

    def _capacity(self) -> float:
        """The most tokens the bucket may hold now."""
        return max(float(self._floor), self._ratio * self._in_flight)


def _failure(retry_state: RetryCallState) -> BaseException | None:
    """The exception the last attempt raised, if any."""
    outcome = retry_state.outcome
    if outcome is None or not outcome.failed:
        return None
    return outcome.exception()


def _asked_wait(retry_state: RetryCallState, clock: Clock) -> float | None:
    """Seconds the last upstream answer asked us to wait (Retry-After), uncapped, or None."""
    error = _failure(retry_state)
    return error.retry_after(clock.now()) if isinstance(error, RetryableStatus) else None


class retry_if_status(retry_base):  # noqa: N801 - tenacity's naming, composes with `|`
    """Retry a RetryableStatus whose status is one of `statuses`."""

    def __init__(self, statuses: tuple[int, ...]) -> None:
        self.statuses = frozenset(statuses)

    def __call__(self, retry_state: RetryCallState) -> bool:
        error = _failure(retry_state)
        return isinstance(error, RetryableStatus) and error.status in self.statuses


class wait_retry_after(wait_base):  # noqa: N801
    """Wait what the upstream asked for (Retry-After), at most `cap` seconds; 0 when it asked nothing."""

    def __init__(self, clock: Clock, cap: float) -> None:
        self.clock = clock
        self.cap = cap

    def __call__(self, retry_state: RetryCallState) -> float:
        asked = _asked_wait(retry_state, self.clock)
        return 0.0 if asked is None else min(asked, self.cap)


class wait_max(wait_base):  # noqa: N801
    """Wait the longest of several waits."""

    def __init__(self, *waits: wait_base) -> None:
        self.waits = waits

    def __call__(self, retry_state: RetryCallState) -> float:
        return max(wait(retry_state) for wait in self.waits)


class stop_at_deadline(stop_base):  # noqa: N801
    """Stop when the coming wait, or the wait the upstream asked for, reaches `deadline_at` (monotonic)."""

    def __init__(self, deadline_at: float, clock: Clock) -> None:
        self.deadline_at = deadline_at
        self.clock = clock

    def __call__(self, retry_state: RetryCallState) -> bool:
        remaining = self.deadline_at - self.clock.monotonic()
        asked = _asked_wait(retry_state, self.clock) or 0.0
        return max(retry_state.upcoming_sleep, asked) >= remaining


class stop_unless_budget(stop_base):  # noqa: N801
    """Stop when `stop` says so; otherwise spend a retry token, and stop when there is none."""

    def __init__(self, stop: stop_base, budget: RetryBudget) -> None:
        self.stop = stop
        self.budget = budget

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.stop(retry_state) or not self.budget.try_spend()


def build_retrying(config: RetryConfig, *, budget: RetryBudget, deadline_at: float, clock: Clock,
                   sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                   on_retry: Callable[[RetryCallState], None] | None = None) -> AsyncRetrying:
    """The retry policy for one request on one provider.

    Retries RetryableStatus in `config.statuses` and UpstreamConnectError; waits the longer of a
    jittered exponential backoff and the upstream's Retry-After (capped); stops after
    `max_retries` retries, when the wait would reach `deadline_at` (or Retry-After asks for longer
    than is left), or when `budget` refuses. The last error is re-raised. Wrap only the part before
    the first byte reaches the client, and bracket the request with `budget.start()`/`finish()`.
    """
    backoff = wait_exponential_jitter(
        multiplier=config.backoff_base_s, max=config.backoff_cap_s, jitter=config.backoff_base_s)
    give_up = stop_after_attempt(config.max_retries + 1) | stop_at_deadline(deadline_at, clock)
    return AsyncRetrying(
        retry=retry_if_exception_type(UpstreamConnectError) | retry_if_status(config.statuses),
        wait=wait_max(backoff, wait_retry_after(clock, config.retry_after_cap_s)),
        stop=stop_unless_budget(give_up, budget),
        sleep=sleep,
        before_sleep=on_retry,
        reraise=True,
    )
