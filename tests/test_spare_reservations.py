"""Spare reservations through the real gateway: the next request's budget is held before it arrives,
without ever letting spend pass a limit or leaving anything behind."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import pytest

from gateway.budget.factory import create_store
from gateway.budget.spares import SPARE_ROOM
from gateway.budget.store import BudgetStore, CounterKey
from gateway.clock import FakeClock
from gateway.config.model import StoreConfig
from gateway.domain.pricing import Usage, cost_nano, nano_to_usd
from gateway.errors import StoreError
from gateway.http.appkeys import BUDGET
from tests.support.settings import ADMIN_KEY, OTHER_KEY, PRICES, make_policy, make_settings

CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "spare me"}], "max_tokens": 10}
BIG_CHAT = {**CHAT, "max_tokens": 400}
WARM_BURSTS = 6   # bursts of 8 concurrent requests: enough for a pool to grow to 8 spares (it doubles per batch)


@pytest.fixture(params=["embedded", "redis"])
def store_config(request, tmp_path) -> StoreConfig:
    """Spares on (the default), on the embedded store and on a real redis-server."""
    if request.param == "redis":
        return StoreConfig(url=request.getfixturevalue("redis_url"))
    return StoreConfig(path=str(tmp_path / "budget.db"))


class GatedReserves:
    """A store whose reserve calls wait while `gate` is clear; every other call passes through."""

    def __init__(self, inner) -> None:
        self.inner, self.gate, self.reserves = inner, asyncio.Event(), 0
        self.gate.set()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def reserve(self, *args, **kwargs):
        self.reserves += 1
        await self.gate.wait()
        return await self.inner.reserve(*args, **kwargs)

    async def reserve_spares(self, *args, **kwargs):
        self.reserves += 1
        await self.gate.wait()
        return await self.inner.reserve_spares(*args, **kwargs)


_: type[BudgetStore] = GatedReserves   # fakes that keep the store contract (mypy checks them)


async def budget(http, gateway, policy: str = "global") -> dict[str, dict]:
    reply = await http(gateway, "GET", f"/v1/budget/status?policy={policy}", key=ADMIN_KEY)
    assert reply.status == 200, reply.body
    return {entry["unit"]: entry for entry in reply.json()["data"]}


def billed_usd(upstream) -> Decimal:
    billed = upstream.billed.models["gpt-4.1"]
    return nano_to_usd(cost_nano(PRICES["gpt-4.1"], Usage(billed.prompt_tokens, billed.completion_tokens)))


async def drained(*gateways) -> None:
    """What stopping does: spares released, and every store call started so far answered."""
    for gateway in gateways:
        engine = gateway.app[BUDGET]
        await engine.quiet()
        engine.spares.drain()
        await engine.quiet()


async def test_a_request_is_served_on_its_spare_while_the_store_is_still_answering(upstream, start_gateway,
                                                                                    http, store_config):
    settings = make_settings({"primary": upstream.url}, store=store_config,
                             policies=(make_policy("global", usd="10", requests=100),))
    store = GatedReserves(create_store(settings.store))
    gateway = await start_gateway(settings, store=store)
    first = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)
    await gateway.app[BUDGET].settled()
    assert first.status == 200 and store.reserves == 2          # its own reservation, then the next one's

    store.gate.clear()                                           # from now on every reserve hangs
    second = await asyncio.wait_for(http(gateway, "POST", "/v1/chat/completions", json=CHAT), 10)
    assert second.status == 200 and upstream.hits == 2
    store.gate.set()

    await drained(gateway)
    units = await budget(http, gateway)
    assert Decimal(units["usd"]["spent"]) == billed_usd(upstream) and units["requests"]["spent"] == 2
    assert Decimal(units["usd"]["reserved"]) == 0 and units["requests"]["reserved"] == 0
    rows = await gateway.app[BUDGET].store.ledger(0, 2**40, 100)
    # one row per request, under the id the client saw; a spare released unused leaves none
    assert sorted(row.request_id for row in rows) == sorted([first.headers["x-request-id"],
                                                             second.headers["x-request-id"]])


async def test_concurrent_traffic_deepens_the_pool_until_a_burst_needs_no_store_call(upstream, start_gateway,
                                                                                     http, store_config):
    settings = make_settings({"primary": upstream.url}, store=store_config,
                             policies=(make_policy("global", requests=1000),))
    store = GatedReserves(create_store(settings.store))
    gateway = await start_gateway(settings, store=store)

    async def burst() -> list[int]:
        replies = await asyncio.gather(*(http(gateway, "POST", "/v1/chat/completions", json=CHAT)
                                         for _ in range(8)))
        return [reply.status for reply in replies]

    for _ in range(WARM_BURSTS):
        assert await burst() == [200] * 8
        await gateway.app[BUDGET].quiet()
    assert store.reserves < WARM_BURSTS * 8       # spares were asked for several at a time

    store.gate.clear()                             # the store stops answering reserves
    assert await asyncio.wait_for(burst(), 10) == [200] * 8
    store.gate.set()
    await drained(gateway)
    units = await budget(http, gateway)
    served = (WARM_BURSTS + 1) * 8
    assert (units["requests"]["spent"], units["requests"]["reserved"]) == (served, 0) and upstream.hits == served


async def test_spares_never_let_spend_pass_a_limit_across_two_replicas(upstream, start_gateway, http,
                                                                      store_config):
    settings = make_settings({"primary": upstream.url}, store=store_config,
                             policies=(make_policy("global", requests=37),))
    replicas = [await start_gateway(settings), await start_gateway(settings)]
    replies = await asyncio.gather(*(http(replicas[i % 2], "POST", "/v1/chat/completions", json=CHAT)
                                     for i in range(120)))
    served = sum(reply.status == 200 for reply in replies)
    assert 0 < served <= 37 and served == upstream.hits
    # Spares one replica still holds may have refused the other's last requests early; given back (as
    # they are after a second unused), every request of the budget is served, and not one more.
    await drained(*replicas)
    units = await budget(http, replicas[0])
    assert (units["requests"]["spent"], units["requests"]["reserved"]) == (served, 0)
    while (await http(replicas[served % 2], "POST", "/v1/chat/completions", json=CHAT)).status == 200:
        served += 1
    assert served == 37 == upstream.hits


async def test_one_replica_serves_up_to_its_limit_exactly(upstream, start_gateway, http, store_config):
    settings = make_settings({"primary": upstream.url}, store=store_config,
                             policies=(make_policy("global", requests=2 * SPARE_ROOM + 1),))
    gateway = await start_gateway(settings)
    statuses = [(await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status
                for _ in range(2 * SPARE_ROOM + 2)]
    assert statuses == [200] * (2 * SPARE_ROOM + 1) + [429]


async def test_a_request_its_spare_does_not_cover_takes_the_spares_budget_back(upstream, start_gateway, http,
                                                                              store_config):
    """The spare holds a small request's worst case; a big request that fits only without it is served."""
    probe = await start_gateway(make_settings({"primary": upstream.url}, store=store_config,
                                              policies=(make_policy("probe", usd="100"),)))
    small, big = [await spare_held_after(http, probe, body, "probe") for body in (CHAT, BIG_CHAT)]
    assert big > SPARE_ROOM * small

    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store_config,
                                                policies=(make_policy("global", usd="100"),)))
    before = billed_usd(upstream)
    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    first_cost = billed_usd(upstream) - before
    # Room for the first request's spare, then for the big request only once that spare is given back.
    limit = (first_cost + big + small / 2).quantize(Decimal("1e-9"))
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store_config,
                                                policies=(make_policy("tight", usd=str(limit)),)))
    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    await gateway.app[BUDGET].settled()
    assert Decimal((await budget(http, gateway, "tight"))["usd"]["reserved"]) == small       # the spare

    assert (await http(gateway, "POST", "/v1/chat/completions", json=BIG_CHAT)).status == 200
    await drained(gateway)
    usd = (await budget(http, gateway, "tight"))["usd"]
    assert Decimal(usd["spent"]) <= limit and Decimal(usd["reserved"]) == 0


async def spare_held_after(http, gateway, body: dict, policy: str) -> Decimal:
    """The USD a policy holds in spares once `body` has been served and settled: its worst case."""
    await drained(gateway)
    assert (await http(gateway, "POST", "/v1/chat/completions", json=body)).status == 200
    await gateway.app[BUDGET].settled()
    return Decimal((await budget(http, gateway, policy))["usd"]["reserved"])


@pytest.mark.parametrize("limit, spare_made", [(SPARE_ROOM + 1, True), (SPARE_ROOM, False)])
async def test_a_spare_is_made_only_while_the_budget_has_room_for_several_more(upstream, start_gateway, http,
                                                                             store_config, limit, spare_made):
    settings = make_settings({"primary": upstream.url}, store=store_config,
                             policies=(make_policy("global", requests=limit),))
    gateway = await start_gateway(settings)
    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    await gateway.app[BUDGET].settled()
    units = await budget(http, gateway)
    assert (units["requests"]["spent"], units["requests"]["reserved"]) == (1, int(spare_made))


async def test_a_spare_not_taken_is_released_after_its_idle_time(upstream, start_gateway, http, store_config):
    store = StoreConfig(**{**store_config.__dict__, "reserve_ahead_idle_s": 0.05})
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store,
                                                policies=(make_policy("global", requests=100),)))
    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    deadline = time.monotonic() + 5
    while (units := await budget(http, gateway))["requests"]["reserved"] and time.monotonic() < deadline:
        await asyncio.sleep(0.02)        # waiting for the idle timer to fire, not for a race
    assert (units["requests"]["spent"], units["requests"]["reserved"]) == (1, 0)
    assert [row.status for row in await gateway.app[BUDGET].store.ledger(0, 2**40, 100)] == ["served"]


async def test_a_spare_of_yesterdays_window_is_never_spent_today(upstream, start_gateway, http, store_config):
    clock = FakeClock(1_796_169_599.5)                    # 2026-12-01T23:59:59.5Z
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store_config,
                                                policies=(make_policy("global", requests=100),)), clock=clock)
    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    await gateway.app[BUDGET].settled()
    clock.advance(0.75)                                   # the next day, while the spare is fresh
    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    await drained(gateway)
    store = gateway.app[BUDGET].store
    days = await store.read([CounterKey("global", "daily", day) for day in ("d2026-12-01", "d2026-12-02")],
                            clock.now())
    assert [(day.spent.requests, day.reserved.requests) for day in days] == [(1, 0), (1, 0)]


async def test_stopping_the_gateway_releases_its_spares(upstream, start_gateway, http, redis_url):
    settings = make_settings({"primary": upstream.url}, store=StoreConfig(url=redis_url),
                             policies=(make_policy("global", requests=100),))
    leaving, staying = await start_gateway(settings), await start_gateway(settings)
    assert (await http(leaving, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    await leaving.app[BUDGET].settled()
    assert (await budget(http, staying))["requests"]["reserved"] == 1
    await leaving.server.close()                           # the app's cleanup closes the budget engine
    units = await budget(http, staying)
    assert (units["requests"]["spent"], units["requests"]["reserved"]) == (1, 0)


async def test_a_spare_held_before_an_outage_serves_one_request_and_is_counted_once(durable_redis, upstream,
                                                                                    start_gateway, http):
    """fail_closed: the one request whose budget the store already holds is served, every other refused."""
    settings = make_settings({"primary": upstream.url}, store=StoreConfig(url=durable_redis.url),
                             policies=(make_policy("global", usd="1"),))
    gateway = await start_gateway(settings)
    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    engine = gateway.app[BUDGET]
    await engine.settled()

    durable_redis.kill()
    statuses = [(await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status for _ in range(3)]
    assert statuses == [200, 503, 503] and upstream.hits == 2
    await engine.settled()
    assert engine.journal is not None and engine.journal.has_entries()   # the spare's settle waits there

    durable_redis.start()
    assert await engine.recover()
    await drained(gateway)
    units = await budget(http, gateway)
    assert (Decimal(units["usd"]["spent"]), Decimal(units["usd"]["reserved"])) == (billed_usd(upstream), 0)


async def test_a_refused_request_takes_back_spares_its_other_policies_hold(upstream, start_gateway, http,
                                                                          store_config):
    """The web team's spare holds on the global budget too; a data request needing that room gets it."""
    policies = (make_policy("global", requests=2 * SPARE_ROOM - 3), make_policy("web", requests=100, teams=("web",)))
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store_config, policies=policies))
    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200   # the web team
    await gateway.app[BUDGET].quiet()
    assert (await budget(http, gateway))["requests"]["reserved"] == 1                        # its spare

    statuses = [(await http(gateway, "POST", "/v1/chat/completions", json=CHAT, key=OTHER_KEY)).status
                for _ in range(2 * SPARE_ROOM - 3)]
    assert statuses == [200] * (2 * SPARE_ROOM - 4) + [429]
    await drained(gateway)
    units = await budget(http, gateway)
    assert (units["requests"]["spent"], units["requests"]["reserved"]) == (2 * SPARE_ROOM - 3, 0)


class SpareReleaseFailsOnce:
    """The store, except that the first release of a spare fails as if Redis blinked."""

    def __init__(self, inner) -> None:
        self.inner, self.failed = inner, False

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def release(self, request_id, *args, **kwargs):
        if request_id.startswith("spare-") and not self.failed:
            self.failed = True
            raise StoreError("connection lost")
        return await self.inner.release(request_id, *args, **kwargs)


_ = SpareReleaseFailsOnce


async def test_a_spare_whose_release_fails_is_journaled_and_released_when_the_store_is_back(upstream, start_gateway, http,
                                                                                   redis_url):
    store = StoreConfig(url=redis_url, reserve_ahead_idle_s=0.05)
    settings = make_settings({"primary": upstream.url}, store=store, policies=(make_policy("global", requests=100),))
    gateway = await start_gateway(settings, store=SpareReleaseFailsOnce(create_store(settings.store)))
    engine = gateway.app[BUDGET]
    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    deadline = time.monotonic() + 5
    while not engine.journal.has_entries() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)        # waiting for the idle timer and the failed release, not for a race
    await engine.quiet()
    assert engine.journal.has_entries()
    assert (await budget(http, gateway))["requests"]["reserved"] == 1

    assert await engine.recover()
    units = await budget(http, gateway)
    assert (units["requests"]["spent"], units["requests"]["reserved"]) == (1, 0)
    assert [row.status for row in await engine.store.ledger(0, 2**40, 100)] == ["served"]


async def test_a_request_refused_while_another_replicas_spare_holds_the_room_is_told_to_retry_soon(
        upstream, start_gateway, http, store_config):
    settings = make_settings({"primary": upstream.url}, store=store_config,
                             policies=(make_policy("global", requests=SPARE_ROOM + 1),))
    holder, other = await start_gateway(settings), await start_gateway(settings)
    assert (await http(holder, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    await holder.app[BUDGET].quiet()                   # the holder keeps a spare: one request's room
    for _ in range(SPARE_ROOM - 1):
        assert (await http(other, "POST", "/v1/chat/completions", json=CHAT)).status == 200

    busy = await http(other, "POST", "/v1/chat/completions", json=CHAT)
    assert busy.status == 429 and busy.json()["error"]["code"] == "budget_exceeded"
    assert (busy.headers["Retry-After"], busy.headers["x-should-retry"]) == ("1", "true")

    await drained(holder)                              # what a second without traffic does
    assert (await http(other, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    spent = await http(other, "POST", "/v1/chat/completions", json=CHAT)
    assert spent.status == 429 and spent.headers["x-should-retry"] == "false"
    assert int(spent.headers["Retry-After"]) > 1 and upstream.hits == SPARE_ROOM + 1
