"""One contract for every BudgetStore backend: fakeredis, redis-server, Redis Cluster, Sentinel, SQLite.

redis-server runs twice: auto-pipelined, and through redis-py's public API (what a redis-py release the
pipeline was not checked on gets).

Time is a FakeClock started at the real time (Redis expires keys on its own clock), moved by tests.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from gateway.budget.canary_record import RAMPING, ROLLED_BACK, ArmTally, CanaryRecord
from gateway.budget.journal import Replay, SpendJournal
from gateway.budget.redis_store import RedisBudgetStore, create_redis_client
from gateway.budget.sqlite_store import SqliteBudgetStore
from gateway.budget.store import (
    MAX_AMOUNT, SWEEP_MAX, BudgetStore, CounterKey, CounterState, LedgerEntry, Limits, ReserveLine, time_ms,
)
from gateway.budget.windows import window_for
from gateway.clock import FakeClock
from gateway.domain.pricing import Charge
from gateway.errors import StoreError
from tests.support.redis_server import RedisServer
from tests.support.redis_writes import RedisWrites

GRACE_S = 86_400.0
LEASE_S = 900.0
POOL_SIZE = 16
UNLIMITED: Limits = (None, None, None)
REDIS_BACKENDS = ("fakeredis", "redis", "redis-public-api", "cluster", "sentinel")
URL_FIXTURES = {"redis": "redis_url", "redis-public-api": "redis_url", "cluster": "redis_cluster_url",
                "sentinel": "redis_sentinel_url"}


@dataclass
class Backend:
    """A store under test, with its Redis client when it has one."""

    store: BudgetStore
    client: Any = None


async def _open_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    name = request.param
    if name == "sqlite":
        return Backend(SqliteBudgetStore(str(tmp_path / "budget.db")))
    if name == "fakeredis":
        pytest.importorskip("lupa", reason="fakeredis runs Lua only with lupa, which is not installed")
        from fakeredis.aioredis import FakeRedis

        client: Any = FakeRedis()
    else:
        if name == "redis-public-api":       # a release the pipeline was not checked on: the store falls back
            request.getfixturevalue("monkeypatch").setattr(redis, "__version__", "9.1.0")
        url = request.getfixturevalue(URL_FIXTURES[name])
        client = create_redis_client(url, timeout_s=5.0, pool_size=POOL_SIZE)
    return Backend(RedisBudgetStore(client, max_in_flight=POOL_SIZE), client)


@pytest.fixture(params=[*REDIS_BACKENDS, "sqlite"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    opened = await _open_backend(request, tmp_path)
    yield opened
    await opened.store.close()


@pytest.fixture(params=REDIS_BACKENDS)
async def redis_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    opened = await _open_backend(request, tmp_path)
    yield opened
    await opened.store.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


def counter(clock: FakeClock, policy: str = "team-a", period: str = "daily") -> CounterKey:
    return CounterKey(policy, period, window_for(period, "UTC", clock.now()).id)  # type: ignore[arg-type]


def expiry(clock: FakeClock, period: str = "daily") -> float:
    return window_for(period, "UTC", clock.now()).end_ts + GRACE_S  # type: ignore[arg-type]


def line(clock: FakeClock, key: CounterKey, amount: Charge, limits: Limits = UNLIMITED) -> ReserveLine:
    return ReserveLine(key, amount, limits, expiry(clock, key.period))


async def reserve(store: BudgetStore, clock: FakeClock, request_id: str, *lines: ReserveLine) -> bool:
    outcome = await store.reserve(request_id, lines, clock.now(), clock.now() + LEASE_S)
    return outcome.ok


async def state(store: BudgetStore, clock: FakeClock, key: CounterKey) -> CounterState:
    [found] = await store.read([key], clock.now())
    return found


def entry(clock: FakeClock, request_id: str, *, cost: int = 700, status: str = "served",
          policies: tuple[str, ...] = ("team-a",)) -> LedgerEntry:
    """A ledger row at the clock's time (whole milliseconds, as the ledger keeps it)."""
    return LedgerEntry(time=time_ms(clock.now()) / 1000, request_id=request_id, caller="web-app", team="web",
                       policies=policies, model="gpt-4.1", provider="primary", prompt_tokens=50,
                       completion_tokens=20, cached_tokens=10, cost_nano=cost, status=status,  # type: ignore[arg-type]
                       latency_ms=42, attempts=1)


async def ledger(store: BudgetStore, clock: FakeClock, limit: int = 1000) -> list[LedgerEntry]:
    """Every ledger row of the last day and the next."""
    return await store.ledger(clock.now() - 86_400, clock.now() + 86_400, limit)


async def test_reserve_within_limit_adds_to_reserved(backend: Backend, clock: FakeClock) -> None:
    key = counter(clock)
    amount = Charge(usd_nano=1_500_000, tokens=1200, requests=1)
    outcome = await backend.store.reserve(
        "r1", [line(clock, key, amount, (10**9, 10**6, 100))], clock.now(), clock.now() + LEASE_S
    )
    assert outcome.ok and outcome.refused_index is None and outcome.refused_unit is None
    assert await state(backend.store, clock, key) == CounterState(key, Charge(), amount)


async def test_read_of_unknown_counter_is_zero(backend: Backend, clock: FakeClock) -> None:
    key = counter(clock, "nobody")
    assert await backend.store.read([key], clock.now()) == [CounterState(key, Charge(), Charge())]


async def test_limit_is_inclusive(backend: Backend, clock: FakeClock) -> None:
    key = counter(clock)
    limits: Limits = (None, 1000, None)
    assert await reserve(backend.store, clock, "a", line(clock, key, Charge(tokens=600), limits))
    assert await reserve(backend.store, clock, "b", line(clock, key, Charge(tokens=400), limits))
    assert not await reserve(backend.store, clock, "c", line(clock, key, Charge(tokens=1), limits))


async def test_spares_are_reserved_together_only_with_room_for_more_and_settle_one_by_one(
        backend: Backend, clock: FakeClock) -> None:
    keys = [counter(clock, "org"), counter(clock, "team")]
    limits: list[Limits] = [(None, None, 100), (None, 1000, 20)]
    assert await reserve(backend.store, clock, "busy", line(clock, keys[1], Charge(tokens=300, requests=7), limits[1]))
    spare = [line(clock, key, Charge(tokens=100, requests=1), lim) for key, lim in zip(keys, limits)]
    until = clock.now() + LEASE_S
    refused = await backend.store.reserve_spares(["s1", "s2", "s3"], spare, clock.now(), until, room=6)
    assert (refused.ok, refused.refused_index, refused.refused_unit) == (False, 1, "tokens")   # 300 + 8 x 100 > 1000
    assert await backend.store.read(keys, clock.now()) == [
        CounterState(keys[0], Charge(), Charge()), CounterState(keys[1], Charge(), Charge(tokens=300, requests=7))]
    assert (await backend.store.reserve_spares(["s1", "s2", "s3"], spare, clock.now(), until, room=4)).ok
    assert [s.reserved for s in await backend.store.read(keys, clock.now())] == [
        Charge(tokens=300, requests=3), Charge(tokens=600, requests=10)]

    assert await backend.store.settle("s2", [(key, Charge(tokens=40, requests=1)) for key in keys], clock.now())
    assert await backend.store.release("s3", clock.now())
    assert [(s.spent, s.reserved) for s in await backend.store.read(keys, clock.now())] == [
        (Charge(tokens=40, requests=1), Charge(tokens=100, requests=1)),
        (Charge(tokens=40, requests=1), Charge(tokens=400, requests=8))]
    with pytest.raises(ValueError):
        await backend.store.reserve_spares(["s1", "s4"], spare, clock.now(), until, room=1)   # s1 is held


async def test_a_refusal_says_whether_only_reservations_in_flight_hold_the_room(backend: Backend,
                                                                                clock: FakeClock) -> None:
    key, limits = counter(clock), (None, None, 10)
    assert await reserve(backend.store, clock, "first", line(clock, key, Charge(requests=7), limits))
    busy = await backend.store.reserve("second", [line(clock, key, Charge(requests=5), limits)], clock.now(),
                                       clock.now() + LEASE_S)
    assert (busy.ok, busy.refused_unit, busy.held) == (False, "requests", True)     # 5 <= 10 - 0 spent
    assert await backend.store.settle("first", [(key, Charge(requests=7))], clock.now())
    spent = await backend.store.reserve("second", [line(clock, key, Charge(requests=5), limits)], clock.now(),
                                        clock.now() + LEASE_S)
    assert (spent.ok, spent.refused_unit, spent.held) == (False, "requests", False)   # 5 > 10 - 7 spent


async def test_a_refusal_names_a_line_that_can_never_fit_before_one_that_is_only_busy(backend: Backend,
                                                                                     clock: FakeClock) -> None:
    org, user = counter(clock, "org"), counter(clock, "user", "monthly")
    limits: list[Limits] = [(None, None, 2), (10, 3, None)]
    assert await reserve(backend.store, clock, "in-flight", line(clock, org, Charge(requests=1), limits[0]))
    wanted = [line(clock, org, Charge(requests=2), limits[0]), line(clock, user, Charge(6, 5, 1), limits[1])]
    never = await backend.store.reserve("r", wanted, clock.now(), clock.now() + LEASE_S)
    assert (never.ok, never.refused_index, never.refused_unit, never.held) == (False, 1, "tokens", False)
    wanted[1] = line(clock, user, Charge(6, 3, 1), limits[1])
    busy = await backend.store.reserve("r", wanted, clock.now(), clock.now() + LEASE_S)
    assert (busy.ok, busy.refused_index, busy.refused_unit, busy.held) == (False, 0, "requests", True)


async def test_refusal_of_one_line_leaves_every_line_unchanged(backend: Backend, clock: FakeClock) -> None:
    keys = [counter(clock, "org"), counter(clock, "team"), counter(clock, "user", "monthly")]
    assert await reserve(backend.store, clock, "warm", *(line(clock, k, Charge(100, 10, 1)) for k in keys))
    before = await backend.store.read(keys, clock.now())
    limits: list[Limits] = [(10**6, None, None), (None, 50, None), (None, None, 10)]
    wanted = [line(clock, k, Charge(200, 41, 1), lim) for k, lim in zip(keys, limits)]  # team: 10 + 41 > 50
    outcome = await backend.store.reserve("big", wanted, clock.now(), clock.now() + LEASE_S)
    assert (outcome.ok, outcome.refused_index, outcome.refused_unit) == (False, 1, "tokens")
    assert await backend.store.read(keys, clock.now()) == before
    assert not await backend.store.release("big", clock.now())


async def test_settle_moves_reservation_to_actual_spend(backend: Backend, clock: FakeClock) -> None:
    key, other = counter(clock), counter(clock, "team-b", "monthly")
    reserved = Charge(usd_nano=9_000, tokens=900, requests=1)
    assert await reserve(backend.store, clock, "r1", line(clock, key, reserved), line(clock, other, reserved))
    actual = Charge(usd_nano=4_321, tokens=432, requests=1)
    settled = await backend.store.settle("r1", [(key, actual), (other, actual)], clock.now())
    assert settled == await backend.store.read([key, other], clock.now()) == [
        CounterState(key, actual, Charge()), CounterState(other, actual, Charge()),
    ]


async def test_settle_twice_counts_once(backend: Backend, clock: FakeClock) -> None:
    key = counter(clock)
    assert await reserve(backend.store, clock, "r1", line(clock, key, Charge(1000, 100, 1)))
    assert await backend.store.settle("r1", [(key, Charge(700, 70, 1))], clock.now(), entry(clock, "r1"))
    assert await backend.store.settle("r1", [(key, Charge(700, 70, 1))], clock.now(), entry(clock, "r1")) is None
    assert await state(backend.store, clock, key) == CounterState(key, Charge(700, 70, 1), Charge())
    assert await ledger(backend.store, clock) == [entry(clock, "r1")]


async def test_settle_spends_nothing_where_no_usage_is_given(backend: Backend, clock: FakeClock) -> None:
    key, other = counter(clock, "a"), counter(clock, "b")
    both = line(clock, key, Charge(10)), line(clock, other, Charge(10))
    assert await reserve(backend.store, clock, "r1", *both)
    assert await backend.store.settle("r1", [(key, Charge(7))], clock.now())
    assert await backend.store.read([key, other], clock.now()) == [
        CounterState(key, Charge(7), Charge()), CounterState(other, Charge(), Charge()),
    ]


async def test_settle_naming_a_foreign_counter_changes_nothing(backend: Backend, clock: FakeClock) -> None:
    key, stranger = counter(clock, "a"), counter(clock, "stranger")
    assert await reserve(backend.store, clock, "r1", line(clock, key, Charge(10)))
    with pytest.raises(ValueError):
        await backend.store.settle("r1", [(key, Charge(5)), (stranger, Charge(5))], clock.now())
    assert await backend.store.read([key, stranger], clock.now()) == [
        CounterState(key, Charge(), Charge(10)), CounterState(stranger, Charge(), Charge()),
    ]
    assert await backend.store.settle("r1", [(key, Charge(5))], clock.now())


async def test_release_returns_the_reservation(backend: Backend, clock: FakeClock) -> None:
    key = counter(clock)
    assert await reserve(backend.store, clock, "r1", line(clock, key, Charge(1000, 100, 1)))
    assert await backend.store.release("r1", clock.now())
    assert not await backend.store.release("r1", clock.now())
    assert not await backend.store.settle("r1", [(key, Charge(1))], clock.now())
    assert await state(backend.store, clock, key) == CounterState(key, Charge(), Charge())


async def test_ended_lease_turns_into_spend(backend: Backend, clock: FakeClock) -> None:
    key = counter(clock)
    amount = Charge(5_000, 500, 1)
    assert await reserve(backend.store, clock, "crashed", line(clock, key, amount))
    clock.advance(LEASE_S)
    assert await state(backend.store, clock, key) == CounterState(key, Charge(), amount)  # lease_until == now
    clock.advance(1)
    assert await state(backend.store, clock, key) == CounterState(key, amount, Charge())
    assert not await backend.store.settle("crashed", [(key, Charge(1))], clock.now())
    assert not await backend.store.release("crashed", clock.now())
    assert not await backend.store.record("crashed", [(key, Charge(1), expiry(clock))], clock.now())
    assert await state(backend.store, clock, key) == CounterState(key, amount, Charge())


async def test_settle_after_lease_end_is_refused_before_any_sweep(backend: Backend, clock: FakeClock) -> None:
    key = counter(clock)
    assert await reserve(backend.store, clock, "late", line(clock, key, Charge(800)))
    clock.advance(LEASE_S + 1)
    assert not await backend.store.settle("late", [(key, Charge(300))], clock.now())
    assert await state(backend.store, clock, key) == CounterState(key, Charge(800), Charge())


async def test_reserve_sweeps_at_most_sweep_max_ended_leases(backend: Backend, clock: FakeClock) -> None:
    key = counter(clock)
    for index in range(SWEEP_MAX + 4):
        assert await reserve(backend.store, clock, f"crashed-{index}", line(clock, key, Charge(tokens=1)))
    clock.advance(LEASE_S + 1)
    assert await reserve(backend.store, clock, "fresh", line(clock, key, Charge(tokens=100)))
    expired = [row for row in await ledger(backend.store, clock) if row.status == "lease_expired"]
    assert len(expired) == SWEEP_MAX   # the reserve swept SWEEP_MAX of them; the read below sweeps the rest
    after_read = await state(backend.store, clock, key)
    assert after_read == CounterState(key, Charge(tokens=SWEEP_MAX + 4), Charge(tokens=100))


async def test_record_is_idempotent_by_request_id(backend: Backend, clock: FakeClock) -> None:
    key, monthly = counter(clock), counter(clock, period="monthly")
    cost = Charge(250, 25, 1)
    spend = [(key, cost, expiry(clock)), (monthly, cost, expiry(clock, "monthly"))]
    assert await backend.store.record("replayed", spend, clock.now())
    assert not await backend.store.record("replayed", spend, clock.now())
    assert await backend.store.read([key, monthly], clock.now()) == [
        CounterState(key, cost, Charge()), CounterState(monthly, cost, Charge()),
    ]


async def test_a_settle_sent_again_counts_once(backend: Backend, clock: FakeClock) -> None:
    key = counter(clock)
    assert await reserve(backend.store, clock, "r1", line(clock, key, Charge(1000)))
    served = entry(clock, "r1", cost=600)
    assert await backend.store.settle("r1", [(key, Charge(600))], clock.now(), served)
    assert await backend.store.settle("r1", [(key, Charge(600))], clock.now(), served) is None
    assert await state(backend.store, clock, key) == CounterState(key, Charge(600), Charge())
    assert await ledger(backend.store, clock) == [served]


async def test_a_settled_request_leaves_nothing_of_its_own_in_redis(redis_backend: Backend, clock: FakeClock) -> None:
    key = counter(clock)
    assert await reserve(redis_backend.store, clock, "r1", line(clock, key, Charge(1000)))
    assert await redis_backend.store.settle("r1", [(key, Charge(600))], clock.now(), entry(clock, "r1"))
    client = redis_backend.client
    assert await client.exists("{gw}:resv:r1", "{gw}:spent:r1") == 0   # no per-request key stays
    assert await client.zscore("{gw}:leases", "r1") is None


async def replay(backend: Backend, clock: FakeClock, tmp_path: Path, request_id: str, spend: Charge,
                 row: LedgerEntry, how: Replay, key: CounterKey) -> int:
    """Journal one request as the engine does when its settle or release fails, then replay the journal."""
    journal = SpendJournal(tmp_path / "journal.jsonl")
    journal.append(request_id, [(key, spend, expiry(clock, key.period))], row, how)
    return await journal.replay(backend.store, clock.now())


@pytest.mark.parametrize("reached_the_store", [True, False], ids=["answer-lost", "never-sent"])
async def test_a_journaled_settle_counts_once_whether_or_not_it_had_reached_the_store(
        backend: Backend, clock: FakeClock, tmp_path: Path, reached_the_store: bool) -> None:
    key = counter(clock)
    assert await reserve(backend.store, clock, "r1", line(clock, key, Charge(1000)))
    served = entry(clock, "r1", cost=600)
    if reached_the_store:   # it settled, and only its answer was lost on the way back
        assert await backend.store.settle("r1", [(key, Charge(600))], clock.now(), served)
    assert await replay(backend, clock, tmp_path, "r1", Charge(600), served, "settle", key) == 1
    assert await state(backend.store, clock, key) == CounterState(key, Charge(600), Charge())
    assert await ledger(backend.store, clock) == [served]


async def test_a_journaled_settle_replayed_after_its_lease_ended_counts_the_reservation_once(
        backend: Backend, clock: FakeClock, tmp_path: Path) -> None:
    key = counter(clock)
    assert await reserve(backend.store, clock, "r1", line(clock, key, Charge(1000)))
    clock.advance(LEASE_S + 1)
    served = entry(clock, "r1", cost=600)
    assert await replay(backend, clock, tmp_path, "r1", Charge(600), served, "settle", key) == 1
    assert await state(backend.store, clock, key) == CounterState(key, Charge(1000), Charge())
    assert [row.status for row in await ledger(backend.store, clock)] == ["lease_expired"]


async def test_a_journaled_release_frees_the_reservation_once(
        backend: Backend, clock: FakeClock, tmp_path: Path) -> None:
    key = counter(clock)
    assert await reserve(backend.store, clock, "r1", line(clock, key, Charge(1000)))
    failed = entry(clock, "r1", cost=0, status="failed")
    assert await replay(backend, clock, tmp_path, "r1", Charge(), failed, "release", key) == 1
    assert await replay(backend, clock, tmp_path, "r1", Charge(), failed, "release", key) == 1
    assert await state(backend.store, clock, key) == CounterState(key, Charge(), Charge())
    assert await ledger(backend.store, clock) == [failed]


def journal_of(tmp_path: Path, clock: FakeClock, key: CounterKey, count: int) -> SpendJournal:
    """A journal of `count` requests the store never saw (served on the fail-open allowance)."""
    journal = SpendJournal(tmp_path / "journal.jsonl")
    for index in range(count):
        journal.append(f"r{index}", [(key, Charge(7, 1, 1), expiry(clock))], entry(clock, f"r{index}", cost=7))
    return journal


async def test_a_long_journal_replays_every_request_once(backend: Backend, clock: FakeClock, tmp_path: Path) -> None:
    key = counter(clock)
    journal = journal_of(tmp_path, clock, key, 600)
    assert await journal.replay(backend.store, clock.now()) == 600
    assert await journal.replay(backend.store, clock.now()) == 0
    assert await state(backend.store, clock, key) == CounterState(key, Charge(4200, 600, 600), Charge())
    assert len(await ledger(backend.store, clock)) == 600


async def test_a_journal_replays_many_requests_per_write_to_redis(
    redis_url: str, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a long outage the counters catch up in batches, not one round trip per journaled request."""
    store = RedisBudgetStore(create_redis_client(redis_url, timeout_s=5.0, pool_size=4))
    key = counter(clock)
    journal = journal_of(tmp_path, clock, key, 600)
    try:
        assert await store.ping()
        sent = RedisWrites(monkeypatch)
        assert await journal.replay(store, clock.now()) == 600
    finally:
        await store.close()
    assert sum(sent.calls_per_write()) == 600 and len(sent.writes) <= 20   # one write per request before


async def test_record_replaces_a_live_reservation(backend: Backend, clock: FakeClock) -> None:
    key = counter(clock)
    assert await reserve(backend.store, clock, "r1", line(clock, key, Charge(1000)))
    assert await backend.store.record("r1", [(key, Charge(600), expiry(clock))], clock.now())
    assert not await backend.store.settle("r1", [(key, Charge(600))], clock.now())
    clock.advance(LEASE_S + 1)
    assert await state(backend.store, clock, key) == CounterState(key, Charge(600), Charge())


async def test_settle_release_and_record_write_their_rows_in_order(backend: Backend, clock: FakeClock) -> None:
    key = counter(clock)
    assert await reserve(backend.store, clock, "served", line(clock, key, Charge(1000, 100, 1)))
    assert await reserve(backend.store, clock, "failed", line(clock, key, Charge(1000, 100, 1)))
    served = entry(clock, "served")
    assert await backend.store.settle("served", [(key, Charge(700, 70, 1))], clock.now(), served)
    clock.advance(1)
    failed = entry(clock, "failed", cost=0, status="failed")
    assert await backend.store.release("failed", clock.now(), failed)
    clock.advance(1)
    replayed = entry(clock, "replayed")
    assert await backend.store.record("replayed", [(key, Charge(700, 70, 1), expiry(clock))], clock.now(), replayed)
    assert not await backend.store.record("replayed", [(key, Charge(700), expiry(clock))], clock.now(), replayed)
    assert not await backend.store.release("failed", clock.now(), failed)
    assert await ledger(backend.store, clock) == [served, failed, replayed]


async def test_a_cache_hit_row_moves_no_counter_and_keeps_its_savings_in_order(
        backend: Backend, clock: FakeClock) -> None:
    key = counter(clock)
    assert await reserve(backend.store, clock, "served", line(clock, key, Charge(1000, 100, 1)))
    served = entry(clock, "served")
    assert await backend.store.settle("served", [(key, Charge(700, 70, 1))], clock.now(), served)
    late = entry(clock, "hit", cost=0, status="cache_hit")._replace(saved_nano=700, time=served.time - 5)
    later = entry(clock, "hit-2", cost=0, status="cache_hit")._replace(saved_nano=300, time=served.time + 1)
    await backend.store.file_rows([late, later])
    assert await state(backend.store, clock, key) == CounterState(key, Charge(700, 70, 1), Charge())
    assert await ledger(backend.store, clock) == [served, late._replace(time=served.time), later]


async def test_an_ended_lease_writes_a_lease_expired_row_of_its_reserved_amounts(
        backend: Backend, clock: FakeClock) -> None:
    keys = [counter(clock, "team-b"), counter(clock, "team-a"), counter(clock, "team-a", "monthly")]
    assert await reserve(backend.store, clock, "crashed", *(line(clock, k, Charge(5_000, 500, 1)) for k in keys))
    clock.advance(LEASE_S + 1)
    assert (await state(backend.store, clock, keys[0])).spent == Charge(5_000, 500, 1)
    assert await ledger(backend.store, clock) == [LedgerEntry(
        time=time_ms(clock.now()) / 1000, request_id="crashed", caller=None, team=None, policies=("team-a", "team-b"),
        model=None, provider=None, prompt_tokens=500, completion_tokens=0, cached_tokens=0, cost_nano=5_000,
        status="lease_expired", latency_ms=0, attempts=0)]


async def test_ledger_range_is_half_open_and_limited(backend: Backend, clock: FakeClock) -> None:
    key, start = counter(clock), clock.now()
    for index in range(3):
        rows = [(key, Charge(1), expiry(clock))]
        assert await backend.store.record(f"r{index}", rows, clock.now(), entry(clock, f"r{index}"))
        clock.advance(1)
    ids = [[row.request_id for row in await backend.store.ledger(*span)]
           for span in [(start, start + 2, 10), (start, start + 3, 2), (start + 1, start + 1, 10)]]
    assert ids == [["r0", "r1"], ["r0", "r1"], []]


async def test_a_row_older_than_the_last_is_filed_at_the_last_rows_time(backend: Backend, clock: FakeClock) -> None:
    key = counter(clock)
    clock.advance(10)
    assert await backend.store.record("late-clock", [(key, Charge(1), expiry(clock))], clock.now(),
                                      entry(clock, "late-clock"))
    latest = time_ms(clock.now()) / 1000
    clock.set(clock.now() - 10)
    assert await backend.store.record("replayed", [(key, Charge(1), expiry(clock))], clock.now(),
                                      entry(clock, "replayed"))
    rows = await ledger(backend.store, clock)
    assert [(row.request_id, row.time) for row in rows] == [("late-clock", latest), ("replayed", latest)]


async def test_the_ledger_keeps_about_the_newest_max_entries(backend: Backend, clock: FakeClock,
                                                             tmp_path: Path) -> None:
    small: BudgetStore
    if isinstance(backend.store, RedisBudgetStore):
        small = RedisBudgetStore(backend.client, max_in_flight=POOL_SIZE, ledger_max_entries=5)
    else:
        small = SqliteBudgetStore(str(tmp_path / "small.db"), ledger_max_entries=5)
    key = counter(clock)
    for index in range(250):
        row = entry(clock, f"r{index}")
        assert await small.record(row.request_id, [(key, Charge(1), expiry(clock))], clock.now(), row)
    rows = await ledger(small, clock)
    assert 5 <= len(rows) <= 5 + 100  # Redis trims whole stream nodes (MAXLEN ~)
    assert rows[-1].request_id == "r249"
    if isinstance(small, SqliteBudgetStore):
        await small.close()


ALERT_LEASE_S = 120.0


async def claim(store: BudgetStore, clock: FakeClock, key: str, payload: str = "{}", expires_in: float = 3600) -> bool:
    now = clock.now()
    return await store.claim_alert(key, payload, now, now + ALERT_LEASE_S, now + expires_in)


async def test_an_alert_is_claimed_once_while_its_lease_runs_and_never_after_delivery(
        backend: Backend, clock: FakeClock) -> None:
    assert await claim(backend.store, clock, "team-a:daily:d1:0.7")
    assert not await claim(backend.store, clock, "team-a:daily:d1:0.7")
    assert await claim(backend.store, clock, "team-a:daily:d1:0.9")
    clock.advance(ALERT_LEASE_S)             # the lease runs to its last moment
    assert not await claim(backend.store, clock, "team-a:daily:d1:0.7")
    await backend.store.alert_delivered("team-a:daily:d1:0.9", clock.now())
    clock.advance(1)
    assert not await claim(backend.store, clock, "team-a:daily:d1:0.9")   # delivered: never again
    assert await backend.store.pending_alerts(clock.now(), 10) == [("team-a:daily:d1:0.7", "{}")]


async def test_an_undelivered_claim_is_taken_over_with_its_payload_after_its_lease(
        backend: Backend, clock: FakeClock) -> None:
    payload = '{"policy": "team-a", "body": {"text": "Budget warning"}}'
    assert await claim(backend.store, clock, "team-a:daily:d1:0.7", payload)   # this replica then dies
    assert await backend.store.pending_alerts(clock.now(), 10) == []          # its lease still runs

    clock.advance(ALERT_LEASE_S + 1)
    assert await backend.store.pending_alerts(clock.now(), 10) == [("team-a:daily:d1:0.7", payload)]
    assert await claim(backend.store, clock, "team-a:daily:d1:0.7", "{}")      # taken over: payload kept
    assert not await claim(backend.store, clock, "team-a:daily:d1:0.7")        # one taker at a time
    assert await backend.store.pending_alerts(clock.now(), 10) == []
    clock.advance(ALERT_LEASE_S + 1)
    assert await backend.store.pending_alerts(clock.now(), 10) == [("team-a:daily:d1:0.7", payload)]
    await backend.store.alert_delivered("team-a:daily:d1:0.7", clock.now())
    assert await backend.store.pending_alerts(clock.now(), 10) == []


async def test_pending_alerts_come_oldest_lease_first_up_to_the_limit(backend: Backend, clock: FakeClock) -> None:
    for index in range(3):
        assert await claim(backend.store, clock, f"p:daily:d1:{index}", f'"{index}"')
        clock.advance(1)
    clock.advance(ALERT_LEASE_S + 1)
    assert await backend.store.pending_alerts(clock.now(), 2) == [("p:daily:d1:0", '"0"'), ("p:daily:d1:1", '"1"')]


async def test_only_one_of_many_concurrent_claims_wins(backend: Backend, clock: FakeClock) -> None:
    won = await asyncio.gather(*(claim(backend.store, clock, "p:daily:d1:1") for _ in range(20)))
    assert sum(won) == 1


async def test_an_alert_is_forgotten_when_its_window_expires(backend: Backend, clock: FakeClock) -> None:
    assert await claim(backend.store, clock, "team-a:daily:d1:0.7", expires_in=2)
    if isinstance(backend.store, RedisBudgetStore):   # Redis expires keys on its own clock
        ttl_ms = await backend.client.pttl("{gw}:alert:team-a:daily:d1:0.7")
        assert 0 < ttl_ms <= 2000
    else:
        clock.advance(ALERT_LEASE_S + 1)
        assert await backend.store.pending_alerts(clock.now(), 10) == []
        assert await claim(backend.store, clock, "team-a:daily:d1:0.7")


async def test_an_alert_claimed_by_an_earlier_release_counts_as_delivered(redis_backend: Backend,
                                                                          clock: FakeClock) -> None:
    await redis_backend.client.set("{gw}:alert:team-a:daily:d1:0.7", "1")   # that release's SET NX marker
    assert not await claim(redis_backend.store, clock, "team-a:daily:d1:0.7")
    await redis_backend.store.alert_delivered("team-a:daily:d1:0.7", clock.now())
    assert await redis_backend.client.get("{gw}:alert:team-a:daily:d1:0.7") == b"1"


async def test_sqlite_alerts_of_an_earlier_release_are_carried_over_as_delivered(tmp_path: Path,
                                                                                 clock: FakeClock) -> None:
    import sqlite3

    path = str(tmp_path / "budget.db")
    old = sqlite3.connect(path)
    old.executescript("CREATE TABLE alerts (key TEXT PRIMARY KEY, expires_at REAL NOT NULL);")
    old.execute("INSERT INTO alerts VALUES (?, ?)", ("team-a:daily:d1:0.7", clock.now() + 3600))
    old.commit()
    old.close()
    store = SqliteBudgetStore(path)
    assert not await claim(store, clock, "team-a:daily:d1:0.7")
    assert await claim(store, clock, "team-a:daily:d1:0.9")
    await store.close()


async def test_concurrent_reserves_admit_exactly_what_fits(backend: Backend, clock: FakeClock) -> None:
    key = counter(clock)
    cost, budget = Charge(usd_nano=7_000_000, tokens=10, requests=1), 1_000_000_000
    lines = [line(clock, key, cost, (budget, None, None))]
    outcomes = await asyncio.gather(*(
        backend.store.reserve(f"r{i}", lines, clock.now(), clock.now() + LEASE_S) for i in range(300)
    ))
    admitted = sum(outcome.ok for outcome in outcomes)
    assert admitted == budget // cost.usd_nano == 142
    assert all(o.refused_unit == "usd" for o in outcomes if not o.ok)
    assert await state(backend.store, clock, key) == CounterState(
        key, Charge(), Charge(admitted * cost.usd_nano, admitted * 10, admitted)
    )


async def test_unlimited_units_never_refuse(backend: Backend, clock: FakeClock) -> None:
    key = counter(clock)
    huge = Charge(usd_nano=10**15, tokens=10**15, requests=10**15)
    for index in range(3):
        assert await reserve(backend.store, clock, f"r{index}", line(clock, key, huge))
    capped: Limits = (None, None, 4 * 10**15)
    assert await reserve(backend.store, clock, "requests-capped", line(clock, key, huge, capped))
    assert not await reserve(backend.store, clock, "over", line(clock, key, Charge(requests=1), capped))
    assert (await state(backend.store, clock, key)).reserved == Charge(4 * 10**15, 4 * 10**15, 4 * 10**15)


async def test_largest_exact_amounts_compare_exactly(backend: Backend, clock: FakeClock) -> None:
    key = counter(clock)
    limit: Limits = (MAX_AMOUNT, None, None)
    assert await reserve(backend.store, clock, "a", line(clock, key, Charge(MAX_AMOUNT - 1), limit))
    assert not await reserve(backend.store, clock, "b", line(clock, key, Charge(2), limit))
    assert await reserve(backend.store, clock, "c", line(clock, key, Charge(1), limit))
    assert (await state(backend.store, clock, key)).reserved == Charge(MAX_AMOUNT)


async def test_reserving_nothing_is_ok_and_stores_nothing(backend: Backend, clock: FakeClock) -> None:
    outcome = await backend.store.reserve("empty", [], clock.now(), clock.now() + LEASE_S)
    assert outcome.ok
    assert not await backend.store.release("empty", clock.now())
    with pytest.raises(ValueError):
        await backend.store.record("empty", [], clock.now())


async def test_a_request_id_reserves_once(backend: Backend, clock: FakeClock) -> None:
    key = counter(clock)
    assert await reserve(backend.store, clock, "r1", line(clock, key, Charge(10)))
    with pytest.raises(ValueError):
        await reserve(backend.store, clock, "r1", line(clock, key, Charge(10)))
    assert await state(backend.store, clock, key) == CounterState(key, Charge(), Charge(10))


@pytest.mark.parametrize("bad", [Charge(-1), Charge(MAX_AMOUNT + 1), Charge(tokens=1.5)])  # type: ignore
async def test_out_of_range_amounts_are_rejected(backend: Backend, clock: FakeClock, bad: Charge) -> None:
    key = counter(clock)
    with pytest.raises(ValueError):
        await reserve(backend.store, clock, "r1", line(clock, key, bad))
    with pytest.raises(ValueError):
        await backend.store.record("r2", [(key, bad, expiry(clock))], clock.now())
    assert await state(backend.store, clock, key) == CounterState(key, Charge(), Charge())


async def test_counters_expire_after_their_window(backend: Backend, clock: FakeClock) -> None:
    key = counter(clock)
    expires_at = expiry(clock)
    assert await reserve(backend.store, clock, "r1", line(clock, key, Charge(10)))
    if isinstance(backend.store, RedisBudgetStore):
        ttl_ms = await backend.client.pttl(backend.store.counter_key(key))
        assert abs(ttl_ms / 1000 - (expires_at - time.time())) < 5
    else:
        clock.set(expires_at - 1)
        assert (await state(backend.store, clock, key)).spent == Charge(10)  # the lease ended: spend
        clock.set(expires_at + 1)
        assert await state(backend.store, clock, key) == CounterState(key, Charge(), Charge())


async def test_ping(backend: Backend) -> None:
    assert await backend.store.ping()


async def test_scripts_are_reloaded_after_script_flush(redis_backend: Backend, clock: FakeClock) -> None:
    key = counter(clock)
    reserve_sha = redis_backend.store._scripts["reserve"].sha  # type: ignore[attr-defined]
    assert await reserve(redis_backend.store, clock, "before", line(clock, key, Charge(10)))
    await redis_backend.client.script_flush()
    assert await redis_backend.client.script_exists(reserve_sha) == [False]
    assert await reserve(redis_backend.store, clock, "after", line(clock, key, Charge(10)))
    assert await redis_backend.client.script_exists(reserve_sha) == [True]
    assert await redis_backend.store.settle("after", [(key, Charge(5))], clock.now())
    assert await state(redis_backend.store, clock, key) == CounterState(key, Charge(5), Charge(10))


async def test_reserve_and_settle_take_one_round_trip_each(
    redis_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisBudgetStore(create_redis_client(redis_url, timeout_s=5.0, pool_size=4))
    key = counter(clock)
    try:
        assert await reserve(store, clock, "warm-up", line(clock, key, Charge(10)))  # loads scripts, connects
        assert await store.settle("warm-up", [(key, Charge(10))], clock.now())
        sent = RedisWrites(monkeypatch)
        assert await reserve(store, clock, "r1", line(clock, key, Charge(10)))
        assert await store.settle("r1", [(key, Charge(10))], clock.now(), entry(clock, "r1"))
    finally:
        await store.close()
    assert sent.calls_per_write() == [1, 1]


async def test_rows_of_the_earlier_column_layout_read_back_beside_new_rows(redis_backend: Backend,
                                                                           clock: FakeClock) -> None:
    """A ledger written by an earlier release (one stream field per column) stays readable after an upgrade."""
    old = entry(clock, "old", cost=300, policies=("team-a", "global"))
    await redis_backend.client.xadd("{gw}:ledger", {
        "id": old.request_id, "caller": "web-app", "team": "web", "policies": "team-a,global", "model": "gpt-4.1",
        "provider": "primary", "prompt": "50", "completion": "20", "cached": "10", "cost": "300", "status": "served",
        "latency_ms": "42", "attempts": "1"}, id=f"{time_ms(clock.now())}-0")
    anonymous = entry(clock, "new")._replace(caller=None, team=None, policies=())
    assert await redis_backend.store.record("new", [(counter(clock), Charge(1), expiry(clock))], clock.now(),
                                            anonymous)
    assert await ledger(redis_backend.store, clock) == [old, anonymous]


async def test_rows_of_the_previous_json_layout_read_back_with_the_later_fields_defaulted(
        redis_backend: Backend, clock: FakeClock) -> None:
    """A row of the JSON layout before `requested_model` reads with its defaults; one with a later build's extra
    field reads without it."""
    old = entry(clock, "old")
    fields = list(old[1:14])                 # the fields after `time` as the previous build wrote them
    later = entry(clock, "later")._replace(requested_model="gpt-4.1", usage_estimated=True)
    for seq, row in enumerate((fields, [*later[1:], "a field of a later build"])):
        row[3] = list(row[3])
        await redis_backend.client.xadd("{gw}:ledger", {"row": orjson.dumps(row)}, id=f"{time_ms(clock.now())}-{seq}")
    assert await ledger(redis_backend.store, clock) == [old, later]


async def test_an_sqlite_ledger_of_an_earlier_build_gains_the_new_columns(tmp_path: Path, clock: FakeClock) -> None:
    path = str(tmp_path / "old.db")
    old = entry(clock, "old")
    with sqlite3.connect(path) as db:        # the ledger table as the first release made it
        db.execute("CREATE TABLE ledger (seq INTEGER PRIMARY KEY, time_ms INTEGER NOT NULL, request_id TEXT NOT NULL,"
                   " caller TEXT, team TEXT, policies TEXT NOT NULL, model TEXT, provider TEXT, prompt_tokens INTEGER"
                   " NOT NULL, completion_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL, cost_nano INTEGER"
                   " NOT NULL, status TEXT NOT NULL, latency_ms INTEGER NOT NULL, attempts INTEGER NOT NULL)")
        db.execute("INSERT INTO ledger VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (time_ms(old.time), *old[1:4], ",".join(old.policies), *old[5:14]))
    db.close()
    store = SqliteBudgetStore(path)
    new = entry(clock, "new")._replace(model="gpt-4o-mini", requested_model="gpt-4.1", usage_estimated=True)
    try:
        assert await store.record("new", [(counter(clock), Charge(1), expiry(clock))], clock.now(), new)
        assert await ledger(store, clock) == [old, new]
    finally:
        await store.close()


async def test_every_key_shares_one_cluster_hash_tag(redis_backend: Backend, clock: FakeClock) -> None:
    assert await reserve(redis_backend.store, clock, "r1", line(clock, counter(clock), Charge(10)))
    recorded = [(counter(clock, "b"), Charge(1), expiry(clock))]
    assert await redis_backend.store.record("r2", recorded, clock.now(), entry(clock, "r2"))
    assert await claim(redis_backend.store, clock, "b:daily:d1:0.7")
    keys = [key async for key in redis_backend.client.scan_iter(match="*")]
    assert {b"{gw}:ledger", b"{gw}:alert:b:daily:d1:0.7", b"{gw}:alert_leases"} <= set(keys)
    assert len(keys) >= 6 and all(key.startswith(b"{gw}:") for key in keys)


async def test_sqlite_state_survives_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    path = str(tmp_path / "budget.db")
    key = counter(clock)
    store = SqliteBudgetStore(path)
    assert await store.record("done", [(key, Charge(100), expiry(clock))], clock.now())
    assert await reserve(store, clock, "in-flight", line(clock, key, Charge(40)))
    await store.close()

    reopened = SqliteBudgetStore(path)
    try:
        assert await state(reopened, clock, key) == CounterState(key, Charge(100), Charge(40))
        assert not await reopened.record("done", [(key, Charge(100), expiry(clock))], clock.now())
        assert await reopened.settle("in-flight", [(key, Charge(30))], clock.now())
        assert await state(reopened, clock, key) == CounterState(key, Charge(130), Charge())
    finally:
        await reopened.close()


async def test_killed_redis_fails_fast(fresh_redis_server: RedisServer, clock: FakeClock) -> None:
    store = RedisBudgetStore(create_redis_client(fresh_redis_server.url, timeout_s=0.25, pool_size=4))
    key = counter(clock)
    try:
        assert await reserve(store, clock, "r1", line(clock, key, Charge(10)))
        fresh_redis_server.kill()
        await _assert_store_error_within(store.reserve("r2", [line(clock, key, Charge(1))], clock.now(), 0.0))
        await _assert_store_error_within(store.settle("r1", [(key, Charge(5))], clock.now()))
        assert not await store.ping()
        fresh_redis_server.restart()  # an empty dataset: the scripts are gone too
        assert await reserve(store, clock, "r3", line(clock, key, Charge(10)))
    finally:
        await store.close()


async def test_frozen_redis_fails_within_the_timeout(fresh_redis_server: RedisServer, clock: FakeClock) -> None:
    store = RedisBudgetStore(create_redis_client(fresh_redis_server.url, timeout_s=0.25, pool_size=4))
    key = counter(clock)
    try:
        assert await reserve(store, clock, "r1", line(clock, key, Charge(10)))
        fresh_redis_server.pause()
        await _assert_store_error_within(store.read([key], clock.now()))
        await _assert_store_error_within(store.reserve("r2", [line(clock, key, Charge(1))], clock.now(), 0.0))
        fresh_redis_server.resume()
        assert await state(store, clock, key) == CounterState(key, Charge(), Charge(10))
    finally:
        fresh_redis_server.resume()
        await store.close()


async def _assert_store_error_within(call: Any, seconds: float = 1.0) -> None:
    started = time.monotonic()
    with pytest.raises(StoreError):
        await asyncio.wait_for(call, timeout=5)
    assert time.monotonic() - started < seconds


@pytest.mark.parametrize("url", ["memcached://127.0.0.1:11211", "redis+sentinel://127.0.0.1:26379"])
def test_unusable_store_urls_are_rejected(url: str) -> None:
    with pytest.raises(ValueError):
        create_redis_client(url, timeout_s=0.25, pool_size=4)



async def test_a_row_keeps_the_served_and_requested_model_and_the_estimated_flag(backend: Backend,
                                                                                 clock: FakeClock) -> None:
    row = entry(clock, "downgraded")._replace(model="gpt-4o-mini", requested_model="gpt-4.1", usage_estimated=True)
    assert await backend.store.record(row.request_id, [(counter(clock), Charge(1), expiry(clock))], clock.now(), row)
    assert await ledger(backend.store, clock) == [row]


async def test_ledger_rows_keep_any_text(backend: Backend, clock: FakeClock) -> None:
    key = counter(clock)
    row = entry(clock, "r 1|ü")._replace(caller="web app|2", team="équipe 模型", model="modèle 1 | x\n")
    assert await backend.store.record(row.request_id, [(key, Charge(1), expiry(clock))], clock.now(), row)
    assert await ledger(backend.store, clock) == [row]


async def test_concurrent_calls_share_round_trips_and_fail_alone(
    redis_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = create_redis_client(redis_url, timeout_s=5.0, pool_size=4)
    store = RedisBudgetStore(client)
    keys = [counter(clock, f"p{i}") for i in range(40)]
    try:
        await client.set(store.counter_key(keys[7]), "not a hash")
        sent = RedisWrites(monkeypatch).writes
        reserved = await asyncio.gather(*(reserve(store, clock, f"r{i}", line(clock, key, Charge(10)))
                                          for i, key in enumerate(keys)), return_exceptions=True)
        assert isinstance(reserved[7], StoreError) and "WRONGTYPE" in str(reserved[7])
        assert reserved[:7] + reserved[8:] == [True] * 39
        assert len(sent) <= 3
        settled = await asyncio.gather(*(store.settle(f"r{i}", [(key, Charge(4))], clock.now())
                                         for i, key in enumerate(keys) if i != 7))
        assert settled == [[CounterState(key, Charge(4), Charge())] for i, key in enumerate(keys) if i != 7]
    finally:
        await store.close()


async def test_a_call_cancelled_while_it_waits_for_a_batch_is_never_sent(redis_url: str, clock: FakeClock) -> None:
    store = RedisBudgetStore(create_redis_client(redis_url, timeout_s=5.0, pool_size=4))
    key = counter(clock)
    try:
        first = asyncio.create_task(reserve(store, clock, "first", line(clock, key, Charge(10))))
        waiting = asyncio.create_task(reserve(store, clock, "waiting", line(clock, key, Charge(1))))
        await asyncio.sleep(0)   # first is in flight, waiting is queued behind it
        waiting.cancel()
        assert await first
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert await state(store, clock, key) == CounterState(key, Charge(), Charge(10))
        assert not await store.release("waiting", clock.now())
    finally:
        await store.close()


async def test_scripts_are_reloaded_for_a_whole_batch(redis_backend: Backend, clock: FakeClock) -> None:
    key = counter(clock)
    assert await reserve(redis_backend.store, clock, "before", line(clock, key, Charge(10)))
    await redis_backend.client.script_flush()
    calls = [reserve(redis_backend.store, clock, f"r{i}", line(clock, key, Charge(1))) for i in range(20)]
    assert await asyncio.gather(*calls) == [True] * 20
    assert await state(redis_backend.store, clock, key) == CounterState(key, Charge(), Charge(30))


# --- canary records ---------------------------------------------------------------------------------------------

async def test_a_canary_starts_ramping_at_step_0_and_adds_tallies_of_its_step_only(backend: Backend,
                                                                                   clock: FakeClock) -> None:
    store, ttl = backend.store, clock.now() + 3600
    control, candidate = ArmTally(90, 1, 9000, ((54, 89),)), ArmTally(10, 2, 1600, ((54, 7), (60, 1)))

    first = await store.canary_sync("gpt-4.1:abc", -1, (), clock.now(), ttl)
    added = await store.canary_sync("gpt-4.1:abc", 0, (control, candidate), clock.now(), ttl)
    again = await store.canary_sync("gpt-4.1:abc", 0, (control, ArmTally()), clock.now(), ttl)
    stale = await store.canary_sync("gpt-4.1:abc", 3, (control, candidate), clock.now(), ttl)

    assert first == CanaryRecord(0, RAMPING, time_ms(clock.now()) / 1000)
    assert added.arms == (control, candidate)
    assert again.arms == (control + control, candidate) and stale == again


async def test_a_canary_moves_once_by_compare_and_set_and_its_final_state_takes_no_tallies(
        backend: Backend, clock: FakeClock) -> None:
    store, ttl = backend.store, clock.now() + 3600
    await store.canary_sync("c", 0, (ArmTally(5), ArmTally(5)), clock.now(), ttl)
    clock.advance(60)

    moves = await asyncio.gather(*(store.canary_move("c", 0, 1, RAMPING, clock.now(), ttl) for _ in range(5)))
    moved = await store.canary_sync("c", 1, (), clock.now(), ttl)
    rolled_back = await store.canary_move("c", 1, 1, ROLLED_BACK, clock.now(), ttl)
    kept = await store.canary_sync("c", 1, (ArmTally(3), ArmTally(3)), clock.now(), ttl)

    assert sorted(moves) == [False] * 4 + [True]
    assert moved == CanaryRecord(1, RAMPING, time_ms(clock.now()) / 1000)      # its tallies cleared
    assert rolled_back and kept == CanaryRecord(1, ROLLED_BACK, time_ms(clock.now()) / 1000)
    assert not await store.canary_move("c", 1, 2, RAMPING, clock.now(), ttl)
    with pytest.raises(ValueError):
        await store.canary_move("c", 2, 1, RAMPING, clock.now(), ttl)
