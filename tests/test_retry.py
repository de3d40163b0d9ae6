"""Retry policy, Retry-After parsing and the retry budget: injected sleep and a fake clock, no real waits."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Iterable
from email.utils import formatdate

import pytest
from multidict import CIMultiDict
from tenacity import RetryCallState

from gateway.clock import FakeClock
from gateway.config.model import RetryConfig
from gateway.resilience.retry import (
    RetryableStatus,
    RetryBudget,
    UpstreamConnectError,
    build_retrying,
)
from gateway.resilience.retry_after import retry_after_seconds
from tests.support.sleep import RecordingSleep

CONFIG = RetryConfig(max_retries=2, backoff_base_s=0.25, backoff_cap_s=8.0, retry_after_cap_s=30.0,
                     deadline_s=60.0, budget_ratio=0.2, budget_floor=3)




class Upstream:
    """A fake upstream answering a script of statuses (the last one repeats); 200 returns "ok"."""

    def __init__(self, statuses: Iterable[int | Exception], headers: dict[str, str] | None = None,
                 yield_between: bool = False) -> None:
        self.script = list(statuses)
        self.headers = headers or {}
        self.yield_between = yield_between
        self.attempts = 0

    async def __call__(self) -> str:
        answer = self.script[min(self.attempts, len(self.script) - 1)]
        self.attempts += 1
        if self.yield_between:
            await asyncio.sleep(0)            # let other requests interleave, as real I/O would
        if isinstance(answer, Exception):
            raise answer
        if answer != 200:
            raise RetryableStatus(answer, self.headers, b'{"error": {}}')
        return "ok"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sleep(clock: FakeClock) -> RecordingSleep:
    return RecordingSleep(clock)


def fresh_budget(config: RetryConfig = CONFIG) -> RetryBudget:
    return RetryBudget(config.budget_ratio, config.budget_floor)


async def run(upstream: Callable[[], Awaitable[str]], clock: FakeClock,
              sleep: Callable[[float], Awaitable[None]], *, config: RetryConfig = CONFIG,
              budget: RetryBudget | None = None,
              on_retry: Callable[[RetryCallState], None] | None = None) -> str:
    """One request through the policy, bracketed by the budget as the caller does it."""
    budget = budget or fresh_budget(config)
    retrying = build_retrying(config, budget=budget, deadline_at=clock.monotonic() + config.deadline_s,
                              clock=clock, sleep=sleep, on_retry=on_retry)
    budget.start()
    try:
        return await retrying(upstream)
    finally:
        budget.finish()


# --- Retry-After parsing ------------------------------------------------------------------------

NOW = 1_767_225_600.0


@pytest.mark.parametrize(("headers", "expected"), [
    ({"Retry-After": "2"}, 2.0),
    ({"retry-after": "1.5"}, 1.5),
    ({"RETRY-AFTER": " 7 "}, 7.0),
    ({"Retry-After": "-3"}, 0.0),
    ({"retry-after-ms": "1500"}, 1.5),
    ({"Retry-After-Ms": "250", "Retry-After": "9"}, 0.25),
    ({"retry-after-ms": "soon", "Retry-After": "9"}, 9.0),
    ({"Retry-After": formatdate(NOW + 5, usegmt=True)}, 5.0),
    ({"Retry-After": formatdate(NOW - 60, usegmt=True)}, 0.0),
    ({"Retry-After": "Thu, 01 Jan 2026 00:00:10 -0000"}, 10.0),
    ({"Retry-After": "tomorrow"}, None),
    ({"Retry-After": "inf"}, None),
    ({}, None),
])
def test_retry_after_seconds(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_seconds(headers, NOW) == expected


def test_retry_after_reads_aiohttp_headers() -> None:
    assert retry_after_seconds(CIMultiDict({"Retry-After": "3"}), NOW) == 3.0


# --- what is retried ----------------------------------------------------------------------------

async def test_503_503_200_takes_three_attempts(clock: FakeClock, sleep: RecordingSleep) -> None:
    upstream = Upstream([503, 503, 200])
    assert await run(upstream, clock, sleep) == "ok"
    assert upstream.attempts == 3
    assert len(sleep.waits) == 2


async def test_gives_up_after_max_retries_with_the_last_error(clock: FakeClock,
                                                              sleep: RecordingSleep) -> None:
    upstream = Upstream([502])
    with pytest.raises(RetryableStatus) as caught:
        await run(upstream, clock, sleep)
    assert upstream.attempts == CONFIG.max_retries + 1
    assert caught.value.status == 502
    assert caught.value.body == b'{"error": {}}'


async def test_status_outside_the_list_is_not_retried(clock: FakeClock, sleep: RecordingSleep) -> None:
    upstream = Upstream([400, 200])
    with pytest.raises(RetryableStatus):
        await run(upstream, clock, sleep)
    assert upstream.attempts == 1
    assert sleep.waits == []


async def test_connect_errors_are_retried(clock: FakeClock, sleep: RecordingSleep) -> None:
    upstream = Upstream([UpstreamConnectError("refused"), 200])
    assert await run(upstream, clock, sleep) == "ok"
    assert upstream.attempts == 2


async def test_other_exceptions_are_not_retried(clock: FakeClock, sleep: RecordingSleep) -> None:
    upstream = Upstream([KeyError("bug"), 200])
    with pytest.raises(KeyError):
        await run(upstream, clock, sleep)
    assert upstream.attempts == 1


async def test_on_retry_is_called_before_each_retry(clock: FakeClock, sleep: RecordingSleep) -> None:
    seen: list[int] = []
    await run(Upstream([503, 503, 200]), clock, sleep,
              on_retry=lambda state: seen.append(state.attempt_number))
    assert seen == [1, 2]


# --- how long it waits --------------------------------------------------------------------------

async def test_backoff_is_exponential_with_bounded_jitter(clock: FakeClock,
                                                          sleep: RecordingSleep) -> None:
    config = dataclasses.replace(CONFIG, max_retries=6)
    with pytest.raises(RetryableStatus):
        await run(Upstream([503]), clock, sleep, config=config, budget=RetryBudget(0, 10))
    for retry, wait in enumerate(sleep.waits):
        base = 0.25 * 2 ** retry
        assert min(base, 8.0) <= wait <= min(base + 0.25, 8.0)


async def test_retry_after_seconds_is_honoured(clock: FakeClock, sleep: RecordingSleep) -> None:
    await run(Upstream([429, 200], {"Retry-After": "2"}), clock, sleep)
    assert sleep.waits[0] >= 2.0


async def test_retry_after_http_date_is_honoured(clock: FakeClock, sleep: RecordingSleep) -> None:
    headers = {"Retry-After": formatdate(clock.now() + 5, usegmt=True)}
    await run(Upstream([429, 200], headers), clock, sleep)
    assert sleep.waits == [5.0]


async def test_retry_after_ms_is_honoured(clock: FakeClock, sleep: RecordingSleep) -> None:
    await run(Upstream([429, 200], {"retry-after-ms": "1500"}), clock, sleep)
    assert sleep.waits == [1.5]


async def test_retry_after_is_capped(clock: FakeClock, sleep: RecordingSleep) -> None:
    config = dataclasses.replace(CONFIG, deadline_s=1000.0)
    await run(Upstream([429, 200], {"Retry-After": "100"}), clock, sleep, config=config)
    assert sleep.waits == [CONFIG.retry_after_cap_s]


# --- when it stops ------------------------------------------------------------------------------

async def test_retry_after_beyond_the_deadline_gives_up_now(clock: FakeClock,
                                                            sleep: RecordingSleep) -> None:
    config = dataclasses.replace(CONFIG, deadline_s=10.0)
    upstream = Upstream([429, 200], {"Retry-After": "20"})
    with pytest.raises(RetryableStatus):
        await run(upstream, clock, sleep, config=config)
    assert upstream.attempts == 1
    assert sleep.waits == []


async def test_backoff_that_would_pass_the_deadline_stops(clock: FakeClock,
                                                          sleep: RecordingSleep) -> None:
    # first wait is 0.4..0.8 s (< 1 s left); the second is 0.8..1.2 s with at most 0.6 s left
    config = dataclasses.replace(CONFIG, max_retries=10, backoff_base_s=0.4, deadline_s=1.0)
    upstream = Upstream([503])
    with pytest.raises(RetryableStatus):
        await run(upstream, clock, sleep, config=config, budget=RetryBudget(0, 10))
    assert upstream.attempts == 2
    assert sum(sleep.waits) < 1.0


# --- retry budget -------------------------------------------------------------------------------

async def test_a_lone_request_can_retry(clock: FakeClock, sleep: RecordingSleep) -> None:
    upstream = Upstream([503, 200])
    assert await run(upstream, clock, sleep) == "ok"
    assert upstream.attempts == 2


async def test_an_empty_budget_stops_retries(clock: FakeClock, sleep: RecordingSleep) -> None:
    upstream = Upstream([503, 200])
    with pytest.raises(RetryableStatus):
        await run(upstream, clock, sleep, budget=RetryBudget(ratio=0.0, floor=0))
    assert upstream.attempts == 1


@pytest.mark.parametrize("concurrent", [True, False], ids=["concurrent", "one-after-another"])
async def test_budget_bounds_attempts_against_an_always_429_upstream(clock: FakeClock,
                                                                     concurrent: bool) -> None:
    async def no_sleep(_: float) -> None:
        return None

    requests = 200
    budget = fresh_budget()
    upstream = Upstream([429], yield_between=concurrent)

    async def one_request() -> None:
        with pytest.raises(RetryableStatus):
            await run(upstream, clock, no_sleep, budget=budget)

    if concurrent:
        await asyncio.gather(*(one_request() for _ in range(requests)))
    else:
        for _ in range(requests):
            await one_request()
    assert upstream.attempts <= requests * (1 + CONFIG.budget_ratio) + CONFIG.budget_floor + 1
    assert upstream.attempts > requests       # the budget did allow some retries
    assert budget.in_flight == 0


def test_budget_refills_by_ratio_per_request_and_caps_at_capacity() -> None:
    budget = RetryBudget(ratio=0.5, floor=1)
    budget.start()
    assert budget.tokens == 1.0               # capped: max(floor, 0.5 * 1 in flight)
    budget.finish()
    assert budget.try_spend()
    assert not budget.try_spend()
    budget.start()
    assert not budget.try_spend()             # half a token
    budget.start()
    assert budget.try_spend()                 # two deposits make one
    for _ in range(100):
        budget.start()
    assert budget.tokens == pytest.approx(50.0)   # under the capacity of 0.5 * 102 in flight
    for _ in range(102):
        budget.finish()
    assert budget.tokens == 1.0                   # back to the floor: quiet times bank nothing


def test_budget_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RetryBudget(ratio=-0.1, floor=3)
