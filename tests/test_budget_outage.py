"""redis-server killed or frozen mid-run: each outage mode behaves as documented, nothing is lost."""

from __future__ import annotations

import asyncio
import logging
import time
from decimal import Decimal

import pytest
import redis
from redis.asyncio import Redis

from gateway.budget.factory import create_store
from gateway.budget.store import BudgetStore
from gateway.config.model import StoreConfig
from gateway.domain.pricing import Usage, cost_nano, nano_to_usd
from gateway.errors import StoreError
from gateway.http.appkeys import BUDGET
from tests.support.redis_server import RedisServer
from tests.support.settings import PRICES, make_policy, make_settings

CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "outage drill"}], "max_tokens": 5}
DECISION_BOUND_S = 2.0   # connect bound (1 s) + one command (0.25 s), with slack for a loaded CI machine


def billing(upstream) -> Decimal:
    billed = upstream.billed.models["gpt-4.1"]
    return nano_to_usd(cost_nano(PRICES["gpt-4.1"], Usage(billed.prompt_tokens, billed.completion_tokens)))


async def spent_and_reserved(http, gateway) -> tuple[Decimal, Decimal]:
    from tests.support.settings import ADMIN_KEY
    [entry] = (await http(gateway, "GET", "/v1/budget/status", key=ADMIN_KEY)).json()["data"]
    return Decimal(entry["spent"]), Decimal(entry["reserved"])


async def timed_chat(http, gateway, body=CHAT):
    started = time.monotonic()
    reply = await http(gateway, "POST", "/v1/chat/completions", json=body)
    return reply, time.monotonic() - started


async def gateway_on(start_gateway, upstream, redis: RedisServer, mode: str, allowance: str = "0.5"):
    store = StoreConfig(url=redis.url, on_outage=mode, fail_open_allowance=Decimal(allowance), reserve_ahead=False)
    return await start_gateway(make_settings({"primary": upstream.url}, store=store,
                                             policies=(make_policy("global", usd="1"),)))


async def test_fail_closed_refuses_quickly_while_down_and_counts_exactly_after(durable_redis, upstream,
                                                                              start_gateway, http):
    gateway = await gateway_on(start_gateway, upstream, durable_redis, "fail_closed")
    for _ in range(3):
        assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200

    durable_redis.kill()
    for _ in range(3):
        reply, took = await timed_chat(http, gateway)
        assert reply.status == 503 and reply.json()["error"]["code"] == "budget_store_unavailable"
        assert took < DECISION_BOUND_S
    assert upstream.hits == 3                      # nothing was served unchecked

    durable_redis.start()
    assert await gateway.app[BUDGET].recover()
    for _ in range(3):
        assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    assert await spent_and_reserved(http, gateway) == (billing(upstream), 0)


async def test_a_frozen_redis_is_answered_within_the_timeout(durable_redis, upstream, start_gateway, http):
    gateway = await gateway_on(start_gateway, upstream, durable_redis, "fail_closed")
    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    durable_redis.pause()
    try:
        reply, took = await timed_chat(http, gateway)
    finally:
        durable_redis.resume()
    assert reply.status == 503 and took < DECISION_BOUND_S


async def test_fail_open_serves_within_the_allowance_and_replays_the_journal(durable_redis, upstream,
                                                                            start_gateway, http):
    gateway = await gateway_on(start_gateway, upstream, durable_redis, "fail_open")
    for _ in range(3):
        assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200

    upstream.stream_gate = asyncio.Event()         # one stream is in flight when Redis dies
    in_flight = asyncio.create_task(timed_chat(http, gateway, {**CHAT, "stream": True}))
    while upstream.hits < 4:
        await asyncio.sleep(0.01)
    durable_redis.kill()
    upstream.stream_gate.set()
    assert (await in_flight)[0].status == 200      # its settle fails and goes to the journal
    upstream.stream_gate = None
    for _ in range(3):
        reply, took = await timed_chat(http, gateway)
        assert reply.status == 200 and took < DECISION_BOUND_S

    durable_redis.start()       # blocks the loop: a reconnect begun while Redis was down may fail once after it
    assert await gateway.app[BUDGET].recover() or await gateway.app[BUDGET].recover()
    assert await spent_and_reserved(http, gateway) == (billing(upstream), 0)
    assert upstream.billed.models["gpt-4.1"].requests == 7


async def test_fail_open_stops_at_the_local_allowance(durable_redis, upstream, start_gateway, http):
    gateway = await gateway_on(start_gateway, upstream, durable_redis, "fail_open", allowance="0")
    durable_redis.kill()
    reply, _ = await timed_chat(http, gateway)
    assert reply.status == 503 and upstream.hits == 0


class SettleAnswerLostOnce:
    """The Redis store, except that its first settle reaches Redis and then fails as if the answer was lost."""

    def __init__(self, inner) -> None:
        self.inner, self.lost = inner, False

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def settle(self, *args, **kwargs):
        settled = await self.inner.settle(*args, **kwargs)
        if not self.lost:
            self.lost = True
            raise StoreError("connection lost before the answer")
        return settled


_: type[BudgetStore] = SettleAnswerLostOnce   # a fake that keeps the store contract (mypy checks it)


async def test_a_settle_whose_answer_was_lost_is_journaled_and_counted_once(durable_redis, upstream,
                                                                            start_gateway, http):
    settings = make_settings({"primary": upstream.url}, store=StoreConfig(url=durable_redis.url, reserve_ahead=False),
                             policies=(make_policy("global", usd="1"),))
    gateway = await start_gateway(settings, store=SettleAnswerLostOnce(create_store(settings.store)))
    for _ in range(2):
        assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    engine = gateway.app[BUDGET]
    await engine.settled()
    assert engine.journal is not None and engine.journal.has_entries()   # the first settle went to the journal
    assert await engine.recover()
    assert not engine.journal.has_entries()
    assert await spent_and_reserved(http, gateway) == (billing(upstream), 0)


@pytest.fixture
def unchecked_redis_py(monkeypatch: pytest.MonkeyPatch) -> str:
    """The installed redis-py is a release the script pipeline was not checked on (it takes over internals)."""
    monkeypatch.setattr(redis, "__version__", "9.1.0")
    return redis.__version__


async def test_a_redis_py_the_pipeline_was_not_checked_on_serves_budgets_through_its_public_api(
        redis_server, redis_url, unchecked_redis_py, upstream, start_gateway, http, caplog):
    caplog.set_level(logging.INFO, logger="gateway.budget")
    gateway = await gateway_on(start_gateway, upstream, redis_server, "fail_closed")

    statuses = [(await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status for _ in range(4)]
    assert statuses == [200] * 4
    assert (await http(gateway, "GET", "/readyz", key=None)).status == 200
    await gateway.app[BUDGET].settled()
    assert await spent_and_reserved(http, gateway) == (billing(upstream), 0)
    [chosen] = [record for record in caplog.records if record.getMessage().startswith("budget store: Lua scripts")]
    assert "public API" in chosen.getMessage() and unchecked_redis_py in chosen.getMessage()
    assert chosen.levelno == logging.WARNING


class ForeignWriter:
    """A connection's stream writer as a redis-py release might wrap it: redis-py's own commands still work
    through it, but it is no asyncio.StreamWriter, so the script pipeline cannot take its transport over."""

    def __init__(self, inner: asyncio.StreamWriter) -> None:
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def foreign_writers_from_now_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every new redis-py connection keeps its writer in a type the pipeline does not know."""
    from redis.asyncio.connection import Connection

    connect = Connection._connect

    async def wrapped_connect(self) -> None:
        await connect(self)
        self._writer = ForeignWriter(self._writer)

    monkeypatch.setattr(Connection, "_connect", wrapped_connect)


@pytest.mark.parametrize("mode, served", [("fail_closed", 503), ("fail_open", 200)])
async def test_a_redis_py_that_breaks_the_pipeline_at_run_time_engages_the_outage_mode(
        fresh_redis_server, monkeypatch, upstream, start_gateway, http, mode, served):
    gateway = await gateway_on(start_gateway, upstream, fresh_redis_server, mode)
    assert [(await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status for _ in range(2)] == [200] * 2

    foreign_writers_from_now_on(monkeypatch)   # the pipeline's next connection does not fit it
    killer = Redis.from_url(fresh_redis_server.url)
    try:
        await killer.client_kill_filter(_type="normal", skipme=True)
    finally:
        await killer.aclose()
    statuses = [(await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status for _ in range(4)]
    assert statuses == [served] * 4
    ready = await http(gateway, "GET", "/readyz", key=None)
    assert ready.status == 503 and ready.json()["store"] == "unreachable"
    assert await gateway.app[BUDGET].store.wrapped._client.ping()   # plain PING on a pool connection still works
    assert upstream.hits == 2 + (4 if mode == "fail_open" else 0)
