"""Rate windows and requests in flight keep one contract on every store backend (see test_budget_store_contract).

The same reserve / settle / release carry them beside budget lines, in the same call.
"""

from __future__ import annotations

import math

import pytest

from gateway.budget.rate_windows import bucket_ms, concurrent_counter, rate_counter, window_s
from gateway.budget.store import CounterKey, Limits, ReserveLine, ReserveOutcome
from gateway.clock import FakeClock
from gateway.domain.pricing import Charge
from tests.test_budget_store_contract import (  # noqa: F401  (fixtures)
    LEASE_S, Backend, backend, clock, counter, line,
)

ONE = Charge(0, 0, 1)


def rate_line(clock: FakeClock, limits: Limits, amount: Charge = ONE, *, per: str = "minute",
              policy: str = "rpm", each: str | None = None, group: int = 0) -> ReserveLine:
    key = rate_counter(policy, per, clock.now(), each)
    return ReserveLine(key, amount, limits, clock.now() + 2 * window_s(per), group)


def flight_line(clock: FakeClock, limit: int, *, each: str | None = None) -> ReserveLine:
    return ReserveLine(concurrent_counter("flight", each), ONE, (None, None, limit), clock.now() + LEASE_S + 60)


async def reserve(backend: Backend, clock: FakeClock, request_id: str, *lines: ReserveLine,
                  need_group: bool = False) -> ReserveOutcome:
    return await backend.store.reserve(request_id, lines, clock.now(), clock.now() + LEASE_S, need_group)


async def use(backend: Backend, clock: FakeClock, key: CounterKey) -> Charge:
    [state] = await backend.store.read([key], clock.now())
    return state.spent


def start_of_bucket(clock: FakeClock, per: str = "minute") -> None:
    """Move the clock to the start of the next bucket (so a test knows where its window's edges are)."""
    size = bucket_ms(per) / 1000
    clock.set((math.floor(clock.now() / size) + 1) * size)


async def test_a_window_admits_its_limit_then_refuses_until_the_wait_it_names(backend: Backend,
                                                                              clock: FakeClock) -> None:
    start_of_bucket(clock)
    for i in range(3):
        assert (await reserve(backend, clock, f"r{i}", rate_line(clock, (None, None, 3)))).ok
        await backend.store.settle(f"r{i}", [(rate_line(clock, (None, None, 3)).counter, ONE)], clock.now())
    clock.advance(10)
    refused = await reserve(backend, clock, "r3", rate_line(clock, (None, None, 3)))
    assert not refused.ok and refused.refused_unit == "requests" and refused.refused_index == 0
    assert refused.retry_after is not None and 50 < refused.retry_after <= 60 + bucket_ms("minute") / 1000 - 10
    refused_at = clock.now()
    clock.set(refused_at + refused.retry_after - 0.5)
    assert not (await reserve(backend, clock, "r4", rate_line(clock, (None, None, 3)))).ok
    clock.set(refused_at + refused.retry_after)
    assert (await reserve(backend, clock, "r5", rate_line(clock, (None, None, 3)))).ok


async def test_no_burst_passes_where_a_fixed_minute_would_restart(backend: Backend, clock: FakeClock) -> None:
    clock.set(math.floor(clock.now() / 60) * 60 + 59.5)     # half a second before a calendar minute ends
    for i in range(3):
        assert (await reserve(backend, clock, f"r{i}", rate_line(clock, (None, None, 3)))).ok
    clock.advance(1)                                         # a new calendar minute
    assert not (await reserve(backend, clock, "r3", rate_line(clock, (None, None, 3)))).ok
    clock.advance(58)                                        # the three are still within the last 60 s
    assert not (await reserve(backend, clock, "r4", rate_line(clock, (None, None, 3)))).ok


async def test_settled_tokens_replace_the_reserved_worst_case_at_once(backend: Backend, clock: FakeClock) -> None:
    limits: Limits = (None, 1000, None)
    first = rate_line(clock, limits, Charge(0, 800, 1))
    assert (await reserve(backend, clock, "big", first)).ok
    assert not (await reserve(backend, clock, "next", rate_line(clock, limits, Charge(0, 300, 1)))).ok
    await backend.store.settle("big", [(first.counter, Charge(0, 100, 1))], clock.now())
    assert await use(backend, clock, first.counter) == Charge(0, 100, 1)
    assert (await reserve(backend, clock, "next", rate_line(clock, limits, Charge(0, 300, 1)))).ok
    assert await use(backend, clock, first.counter) == Charge(0, 400, 2)


async def test_a_request_larger_than_the_limit_never_fits(backend: Backend, clock: FakeClock) -> None:
    refused = await reserve(backend, clock, "huge", rate_line(clock, (None, 100, None), Charge(0, 101, 1)))
    assert not refused.ok and refused.refused_unit == "tokens" and refused.retry_after == -1


async def test_a_release_gives_the_whole_reservation_back(backend: Backend, clock: FakeClock) -> None:
    held = rate_line(clock, (None, 1000, 2), Charge(0, 600, 1))
    assert (await reserve(backend, clock, "a", held)).ok
    assert await backend.store.release("a", clock.now())
    assert await use(backend, clock, held.counter) == Charge()


async def test_the_outcome_reports_what_the_window_holds(backend: Backend, clock: FakeClock) -> None:
    limits: Limits = (None, 1000, 10)
    assert (await reserve(backend, clock, "a", rate_line(clock, limits, Charge(0, 300, 1)))).used == (1, 300)
    outcome = await reserve(backend, clock, "b", rate_line(clock, limits, Charge(0, 200, 1)))
    assert outcome.ok and outcome.used == (2, 500)


async def test_each_value_has_its_own_window(backend: Backend, clock: FakeClock) -> None:
    for name in ("alice", "bob"):
        assert (await reserve(backend, clock, f"{name}-1", rate_line(clock, (None, None, 1), each=name))).ok
    assert not (await reserve(backend, clock, "alice-2", rate_line(clock, (None, None, 1), each="alice"))).ok
    assert (await reserve(backend, clock, "carol-1", rate_line(clock, (None, None, 1), each="ca:rol@x"))).ok


async def test_a_budget_refusal_leaves_the_rate_window_untouched(backend: Backend, clock: FakeClock) -> None:
    window = rate_line(clock, (None, None, 5))
    budget = line(clock, counter(clock), Charge(500, 10, 1), (100, None, None))
    refused = await reserve(backend, clock, "r", window, budget)
    assert not refused.ok and refused.refused_index == 1
    assert await use(backend, clock, window.counter) == Charge()


async def test_a_rate_refusal_reserves_no_budget(backend: Backend, clock: FakeClock) -> None:
    assert (await reserve(backend, clock, "a", rate_line(clock, (None, None, 1)))).ok
    budget = line(clock, counter(clock), Charge(5, 1, 1), (100, None, None))
    assert not (await reserve(backend, clock, "b", budget, rate_line(clock, (None, None, 1)))).ok
    [state] = await backend.store.read([budget.counter], clock.now())
    assert state.reserved == Charge()


async def test_requests_in_flight_are_held_until_settled(backend: Backend, clock: FakeClock) -> None:
    for i in range(2):
        assert (await reserve(backend, clock, f"f{i}", flight_line(clock, 2))).ok
    refused = await reserve(backend, clock, "f2", flight_line(clock, 2))
    assert not refused.ok and refused.refused_unit == "requests"
    await backend.store.settle("f0", [(flight_line(clock, 2).counter, ONE)], clock.now())
    assert (await reserve(backend, clock, "f3", flight_line(clock, 2))).ok
    [state] = await backend.store.read([flight_line(clock, 2).counter], clock.now())
    assert state.reserved.requests == 2


async def test_a_crashed_replicas_flight_ends_with_its_lease(backend: Backend, clock: FakeClock) -> None:
    assert (await reserve(backend, clock, "lost", flight_line(clock, 1))).ok
    clock.advance(LEASE_S + 1)                               # nobody settles it: its lease ends
    assert (await reserve(backend, clock, "next", flight_line(clock, 1))).ok


async def test_a_group_that_does_not_fit_is_skipped_and_named(backend: Backend, clock: FakeClock) -> None:
    full = rate_line(clock, (None, None, 1), policy="provider-a", group=1)
    assert (await reserve(backend, clock, "a", full)).ok
    other = rate_line(clock, (None, None, 5), policy="provider-b", group=2)
    outcome = await reserve(backend, clock, "b", full, other, need_group=True)
    assert outcome.ok and outcome.skipped == (1,)
    assert await use(backend, clock, full.counter) == ONE
    assert await use(backend, clock, other.counter) == ONE
    await backend.store.settle("b", [(other.counter, ONE)], clock.now())   # only the group it holds


async def test_no_group_fitting_refuses_when_one_is_needed(backend: Backend, clock: FakeClock) -> None:
    only = rate_line(clock, (None, None, 1), policy="provider-a", group=1)
    assert (await reserve(backend, clock, "a", only)).ok
    refused = await reserve(backend, clock, "b", only, need_group=True)
    assert not refused.ok and refused.retry_after is not None and refused.retry_after > 0
    assert (await reserve(backend, clock, "c", only, need_group=False)).skipped == (1,)


async def test_the_lease_end_of_a_rate_line_keeps_its_amount_counted(backend: Backend, clock: FakeClock) -> None:
    held = rate_line(clock, (None, 1000, None), Charge(0, 700, 1))
    assert (await backend.store.reserve("lost", [held], clock.now(), clock.now() + 1)).ok
    clock.advance(2)                                         # its lease ended: the next call sweeps it
    assert not (await reserve(backend, clock, "next", rate_line(clock, (None, 1000, None), Charge(0, 400, 1)))).ok
    assert await use(backend, clock, held.counter) == Charge(0, 700, 1)


@pytest.mark.parametrize("per", ["second", "hour"])
async def test_every_period_slides(backend: Backend, clock: FakeClock, per: str) -> None:
    start_of_bucket(clock, per)
    assert (await reserve(backend, clock, "a", rate_line(clock, (None, None, 1), per=per))).ok
    clock.advance(window_s(per) - 0.001)
    assert not (await reserve(backend, clock, "b", rate_line(clock, (None, None, 1), per=per))).ok
    clock.advance(bucket_ms(per) / 1000 + 0.002)
    assert (await reserve(backend, clock, "c", rate_line(clock, (None, None, 1), per=per))).ok

