"""ScriptPipeline against a real redis-server: replies in order, errors alone, NOSCRIPT, kill, freeze, cancel.

Writes are observed at the pipeline's one seam to the socket (tests/support/redis_writes.py); a paused
(SIGSTOP) server holds replies back, so "written but unanswered" is a state the tests reach without
racing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.budget import redis_batch
from gateway.budget.redis_batch import ScriptPipeline
from gateway.budget.redis_store import create_redis_client
from tests.support.redis_server import RedisServer
from tests.support.redis_writes import RedisWrites

ECHO = "if ARGV[1] == 'fail' then return redis.error_reply('boom ' .. ARGV[2]) end return ARGV"
COUNT = "redis.call('INCR', KEYS[1]) return ARGV"
PROMPT_S = 1.0      # "at once": generous for a loaded CI machine, far below any timeout in play
MARGIN_S = 0.3      # how late past the timeout a timed-out caller may hear of it
LONG_TIMEOUT_S = 5.0


class Opened:
    """A client, the pipeline over it and its scripts."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.client: Redis = create_redis_client(url, timeout_s=timeout_s, pool_size=4)  # type: ignore[assignment]
        self.pipeline = ScriptPipeline(self.client, timeout_s)
        self.echo: AsyncScript = self.client.register_script(ECHO)
        self.count: AsyncScript = self.client.register_script(COUNT)

    def call(self, *args: str) -> asyncio.Future[Any]:
        return self.pipeline.submit(self.echo, [], list(args))

    async def close(self) -> None:
        await self.pipeline.aclose()
        await self.client.aclose()


async def opened(url: str, timeout_s: float = LONG_TIMEOUT_S) -> Opened:
    """A pipeline whose connection is open and whose scripts are loaded."""
    pipe = Opened(url, timeout_s)
    assert await pipe.call("warm", "up") == [b"warm", b"up"]
    assert await pipe.pipeline.run(pipe.count, ["warm"], []) == []
    return pipe


@pytest.fixture
async def pipe(redis_url: str) -> AsyncIterator[Opened]:
    opened_pipe = await opened(redis_url)
    yield opened_pipe
    await opened_pipe.close()


async def outcomes(calls: list[Awaitable[Any]]) -> list[Any]:
    return await asyncio.gather(*calls, return_exceptions=True)


async def test_many_concurrent_callers_each_get_their_own_replies(pipe: Opened) -> None:
    async def caller(task: int) -> None:
        for index in range(10):
            assert await pipe.pipeline.run(pipe.echo, [], [f"t{task}", str(index)]) == [f"t{task}".encode(),
                                                                                      str(index).encode()]

    await asyncio.gather(*(caller(task) for task in range(200)))
    replies = await asyncio.gather(*(pipe.call("one-turn", str(index)) for index in range(2000)))
    assert replies == [[b"one-turn", str(index).encode()] for index in range(2000)]


async def test_an_error_reply_fails_only_its_own_call(pipe: Opened) -> None:
    calls = [pipe.call("fail" if index % 7 == 3 else "ok", str(index)) for index in range(100)]
    for index, outcome in enumerate(await outcomes(calls)):
        if index % 7 == 3:
            assert isinstance(outcome, ResponseError) and str(outcome) == f"boom {index}"
        else:
            assert outcome == [b"ok", str(index).encode()]


async def test_a_script_flush_mid_run_reloads_the_script_once(pipe: Opened, redis_url: str) -> None:
    admin = Redis.from_url(redis_url)
    await admin.config_resetstat()
    done = 0

    async def caller(task: int) -> None:
        nonlocal done
        for index in range(10):
            assert await pipe.call(f"t{task}", str(index)) == [f"t{task}".encode(), str(index).encode()]
            done += 1
            if done == 500:   # half-way, with the other callers' calls in flight
                assert await admin.script_flush()

    try:
        await asyncio.gather(*(caller(task) for task in range(200)))
        assert await admin.script_exists(pipe.echo.sha) == [True]
        stats = await admin.info("commandstats")
        assert stats["cmdstat_script|flush"]["calls"] == 1
        assert stats["cmdstat_script|load"]["calls"] == 1
    finally:
        await admin.aclose()


async def test_a_call_to_an_idle_pipeline_goes_at_once_and_the_rest_of_its_turn_in_one_write(
        pipe: Opened, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = RedisWrites(monkeypatch)
    first = [pipe.call("first", str(index)) for index in range(50)]
    assert len(spy.writes) == 1   # written before this turn ended: nothing was outstanding
    assert len(await asyncio.gather(*first)) == 50
    second = [pipe.call("second", str(index)) for index in range(3)]
    assert len(await asyncio.gather(*second)) == 3
    assert spy.calls_per_write() == [1, 49, 1, 2]


async def test_a_call_behind_one_outstanding_call_goes_at_once_and_behind_two_waits_for_its_turn(
        fresh_redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """At one connection the last request's settle is still outstanding when the next one reserves."""
    pipe = await opened(fresh_redis_server.url)
    spy = RedisWrites(monkeypatch)
    try:
        fresh_redis_server.pause()   # nothing is answered: what was written stays outstanding
        settle = pipe.call("settle", "1")
        await asyncio.sleep(0)        # a later loop turn
        reserve = pipe.call("reserve", "2")
        assert spy.calls_per_write() == [1, 1]   # both written before their turn ended
        same_turn = pipe.call("same", "turn")
        await asyncio.sleep(0)
        third = pipe.call("third", "3")
        assert spy.calls_per_write() == [1, 1, 1]   # two outstanding: queued for the end of its turn
        await spy.until(4, PROMPT_S)
        fresh_redis_server.resume()
        assert await asyncio.gather(settle, reserve, same_turn, third) == [
            [b"settle", b"1"], [b"reserve", b"2"], [b"same", b"turn"], [b"third", b"3"]]
        assert spy.calls_per_write() == [1, 1, 1, 1]
    finally:
        fresh_redis_server.resume()
        await pipe.close()


def lazy(pipe: Opened, *args: str) -> asyncio.Future[Any]:
    return pipe.pipeline.submit(pipe.echo, [], list(args), lazy=True)


async def test_lazy_calls_wait_for_company_and_go_out_together_in_order(
        pipe: Opened, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_batch, "LAZY_FLUSH_S", 60.0)   # only another call can send them here
    spy = RedisWrites(monkeypatch)
    settles = [lazy(pipe, "settle", str(index)) for index in range(3)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)                                     # later loop turns: still waiting
    assert spy.writes == []
    reserve = pipe.call("reserve", "now")                      # not lazy: written at once, behind them
    assert spy.calls_per_write() == [4]
    assert spy.writes[0].index(b"settle") < spy.writes[0].index(b"reserve")
    assert await asyncio.gather(*settles, reserve) == [
        [b"settle", b"0"], [b"settle", b"1"], [b"settle", b"2"], [b"reserve", b"now"]]


async def test_a_lazy_call_alone_goes_out_within_the_lazy_wait(pipe: Opened, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = RedisWrites(monkeypatch)
    calls = [lazy(pipe, "alone", str(index)) for index in range(5)]
    assert spy.writes == []
    async with asyncio.timeout(PROMPT_S):
        assert len(await asyncio.gather(*calls)) == 5
    assert spy.calls_per_write() == [5]


async def test_a_lazy_call_is_timed_from_its_write(pipe: Opened, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_batch, "LAZY_FLUSH_S", 60.0)
    timings: list[tuple[str, float, bool]] = []
    pipe.pipeline.observe = lambda operation, seconds, failed: timings.append((operation, seconds, failed))
    waited = pipe.pipeline.submit(pipe.echo, [], ["settle"], operation="settle", lazy=True)
    loop = asyncio.get_running_loop()
    held_until = loop.time() + 0.2
    while loop.time() < held_until:                            # a lazy call that waits 0.2 s for company
        await asyncio.sleep(0.02)
    await pipe.pipeline.run(pipe.echo, [], ["company"])
    await waited
    [(operation, seconds, failed)] = timings
    assert operation == "settle" and not failed and seconds < 0.2


async def test_answered_sends_lazy_calls_and_waits_for_their_replies(
        pipe: Opened, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_batch, "LAZY_FLUSH_S", 60.0)
    counted = pipe.pipeline.submit(pipe.count, ["lazy-counter"], [], lazy=True)
    await pipe.pipeline.answered()
    assert counted.done()
    assert await pipe.client.get("lazy-counter") == b"1"


async def test_calls_made_while_the_connection_opens_wait_for_it(redis_url: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    admin = Redis.from_url(redis_url)
    await admin.script_load(ECHO)   # no NOSCRIPT resend to count
    await admin.aclose()
    spy = RedisWrites(monkeypatch)
    pipe = Opened(redis_url, LONG_TIMEOUT_S)
    try:
        early = [pipe.call("early", str(index)) for index in range(20)]
        await asyncio.sleep(0)   # one loop turn: the connection is being opened, not yet open
        late = [pipe.call("late", str(index)) for index in range(20)]
        replies = await asyncio.gather(*early, *late)
        assert replies == [[b"early", str(i).encode()] for i in range(20)] + [[b"late", str(i).encode()]
                                                                              for i in range(20)]
        assert spy.calls_per_write() == [40]
    finally:
        await pipe.close()


async def test_a_call_cancelled_before_it_is_written_is_not_sent(pipe: Opened, monkeypatch: pytest.MonkeyPatch,
                                                                 redis_url: str) -> None:
    spy = RedisWrites(monkeypatch)
    first = pipe.pipeline.submit(pipe.count, ["counted"], ["first"])   # goes at once; the others queue
    calls = [pipe.pipeline.submit(pipe.count, ["counted"], [str(index)]) for index in range(3)]
    calls[1].cancel()
    assert await first == [b"first"] and await calls[0] == [b"0"] and await calls[2] == [b"2"]
    assert spy.calls_per_write() == [1, 2]
    admin = Redis.from_url(redis_url)
    try:
        assert await admin.get("counted") == b"3"
    finally:
        await admin.aclose()


async def test_calls_are_sent_without_waiting_for_earlier_replies(fresh_redis_server: RedisServer,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = await opened(fresh_redis_server.url)
    spy = RedisWrites(monkeypatch)
    try:
        fresh_redis_server.pause()
        first = [pipe.call("first", str(index)) for index in range(5)]
        await spy.until(1, PROMPT_S)
        second = [pipe.call("second", str(index)) for index in range(5)]
        await spy.until(2, PROMPT_S)   # written while no reply to the first write can have come
        assert not any(call.done() for call in first + second)
        fresh_redis_server.resume()
        assert await asyncio.gather(*first, *second) == (
            [[b"first", str(i).encode()] for i in range(5)] + [[b"second", str(i).encode()] for i in range(5)])
    finally:
        fresh_redis_server.resume()
        await pipe.close()


async def test_a_cancelled_caller_does_not_shift_later_replies(fresh_redis_server: RedisServer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = await opened(fresh_redis_server.url)
    spy = RedisWrites(monkeypatch)
    try:
        fresh_redis_server.pause()
        callers = [asyncio.create_task(pipe.pipeline.run(pipe.echo, [], ["c", str(i)])) for i in range(10)]
        await spy.until(1, PROMPT_S)   # every call is written, none answered
        callers[3].cancel()
        callers[6].cancel()
        fresh_redis_server.resume()
        results = await outcomes(callers)
        for index, result in enumerate(results):
            if index in (3, 6):
                assert isinstance(result, asyncio.CancelledError)
            else:
                assert result == [b"c", str(index).encode()]
        assert await asyncio.gather(*(pipe.call("after", str(i)) for i in range(10))) == [
            [b"after", str(i).encode()] for i in range(10)]
    finally:
        fresh_redis_server.resume()
        await pipe.close()


async def test_a_killed_redis_fails_calls_in_flight_at_once_and_later_calls_reconnect(
    fresh_redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = await opened(fresh_redis_server.url)
    assert await pipe.client.ping()   # leaves an idle pool connection to the server about to die
    spy = RedisWrites(monkeypatch)
    try:
        fresh_redis_server.pause()   # so that the calls are surely in flight when it dies
        in_flight = [pipe.call("lost", str(index)) for index in range(50)]
        await spy.until(1, PROMPT_S)
        killed = time.monotonic()
        fresh_redis_server.kill()
        async with asyncio.timeout(PROMPT_S):
            results = await outcomes(in_flight)
        assert all(isinstance(result, RedisConnectionError) for result in results)
        assert time.monotonic() - killed < PROMPT_S

        refused = time.monotonic()
        with pytest.raises(RedisConnectionError):
            await pipe.call("while", "down")
        assert time.monotonic() - refused < PROMPT_S

        fresh_redis_server.restart()   # empty, without the scripts
        assert await pipe.call("back", "again") == [b"back", b"again"]
        assert await pipe.client.ping()   # the pool's dead idle connection was closed, not reused
    finally:
        await pipe.close()


async def test_a_frozen_redis_times_out_every_outstanding_call_within_the_timeout(
    fresh_redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeout_s = 0.3
    pipe = await opened(fresh_redis_server.url, timeout_s)
    spy = RedisWrites(monkeypatch)
    try:
        fresh_redis_server.pause()
        started = time.monotonic()
        older = [pipe.call("older", str(index)) for index in range(20)]
        await spy.until(1, PROMPT_S)
        newer = [pipe.call("newer", str(index)) for index in range(20)]
        results = await outcomes(older + newer)
        assert time.monotonic() - started < timeout_s + MARGIN_S
        assert all(isinstance(result, RedisTimeoutError) for result in results)

        reconnecting = time.monotonic()   # a new connection to a frozen Redis: its handshake times out
        with pytest.raises(RedisTimeoutError):
            await pipe.call("still", "frozen")
        assert time.monotonic() - reconnecting < timeout_s + MARGIN_S

        fresh_redis_server.resume()
        assert await pipe.call("thawed") == [b"thawed"]
    finally:
        fresh_redis_server.resume()
        await pipe.close()


async def test_close_fails_outstanding_calls_and_refuses_new_ones(fresh_redis_server: RedisServer,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = await opened(fresh_redis_server.url)
    spy = RedisWrites(monkeypatch)
    try:
        fresh_redis_server.pause()
        outstanding = [pipe.call("closing", str(index)) for index in range(5)]
        await spy.until(1, PROMPT_S)
        queued = pipe.call("queued")
        await pipe.pipeline.aclose()
        results = await outcomes([*outstanding, queued])
        assert all(isinstance(result, RedisConnectionError) for result in results)
        with pytest.raises(RedisConnectionError):
            pipe.call("after", "close")
    finally:
        fresh_redis_server.resume()
        await pipe.close()
