"""Rate limits through the real gateway: windows, tokens, each, max_concurrent, headers, providers, store calls.

Every test runs on the embedded store, a real redis-server and a three-master Redis Cluster; time is a
FakeClock started at the real time (Redis expires keys on its own clock) and moved by the tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import openai
import openai._base_client
import pytest
from aiohttp import web

from gateway.http.appkeys import BUDGET
from gateway.http.auth import key_digest
from gateway.budget.rate_windows import bucket_ms
from gateway.budget.redis_store import RedisBudgetStore, create_redis_client
from gateway.budget.sqlite_store import SqliteBudgetStore
from gateway.clock import FakeClock
from gateway.config.model import ApiKey, BudgetLimit, CallerIdentity, Policy, PolicyMatch, RateLimit, StoreConfig
from gateway.domain.pricing import Usage, cost_nano, nano_to_usd
from gateway.domain.tokens import prompt_upper_bound
from gateway.status_cli import render_rates
from tests.support.settings import ADMIN_KEY, CLIENT_KEY, OTHER_KEY, PRICES, make_policy, make_settings

THIRD_KEY = "sk-client-ops-0004"
CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "count me"}], "max_tokens": 10}
WORST_USD = nano_to_usd(cost_nano(PRICES["gpt-4.1"], Usage(prompt_upper_bound(CHAT), CHAT["max_tokens"])))
STORES = ["embedded", "redis", "cluster"]


@pytest.fixture(params=STORES)
def store_config(request, tmp_path) -> StoreConfig:
    """Spare reservations stay on: a rate-limited request must not take one. A generous store timeout: 300
    requests at once queue on one SQLite file or one Cluster node, and these tests count, not time."""
    if request.param == "redis":
        return StoreConfig(url=request.getfixturevalue("redis_url"), timeout_s=5.0)
    if request.param == "cluster":
        return StoreConfig(url=request.getfixturevalue("redis_cluster_url"), timeout_s=5.0)
    return StoreConfig(path=str(tmp_path / "budget.db"), timeout_s=5.0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


def rate_policy(name: str = "rpm", *, each: str | None = None, requests: int | None = None,
                tokens: int | None = None, per: str = "minute", max_concurrent: int | None = None,
                budgets: tuple[BudgetLimit, ...] = (), **match: Any) -> Policy:
    limits = (RateLimit(per=per, requests=requests, tokens=tokens),) if requests or tokens else ()
    return Policy(name=name, match=PolicyMatch(**match), each=each, rate_limits=limits,  # type: ignore[arg-type]
                  max_concurrent=max_concurrent, budgets=budgets)


def with_third_key(settings):
    third = ApiKey(key_digest(THIRD_KEY), CallerIdentity("ops", team="ops"))
    return dataclasses.replace(settings, keys=(*settings.keys, third))


async def chat(http, gateway, key: str = CLIENT_KEY, **extra):
    return await http(gateway, "POST", "/v1/chat/completions", key=key, json={**CHAT, **extra})


async def test_two_gateways_on_one_store_admit_exactly_the_window_then_the_retry_after(
        upstream, start_gateway, http, store_config, clock):
    settings = make_settings({"primary": upstream.url}, store=store_config,
                             policies=(rate_policy(requests=50),))
    gateways = [await start_gateway(settings, clock=clock) for _ in range(2)]
    replies = await asyncio.gather(*(chat(http, gateways[i % 2]) for i in range(300)))

    assert [r.status for r in replies].count(200) == 50 and upstream.hits == 50
    refused = [r for r in replies if r.status != 200]
    assert {r.status for r in refused} == {429}
    assert {r.json()["error"]["code"] for r in refused} == {"rate_limit_exceeded"}
    assert all(r.headers["x-should-retry"] == "true" for r in refused)
    waits = {int(r.headers["Retry-After"]) for r in refused}
    assert len(waits) == 1 and 60 <= waits.pop() <= 60 + bucket_ms("minute") / 1000

    retry_after = float(refused[0].headers["retry-after-ms"]) / 1000
    clock.advance(retry_after - 1)
    assert (await chat(http, gateways[0])).status == 429     # not before the wait it was told
    clock.advance(1)
    assert (await chat(http, gateways[1])).status == 200     # honoured: it fits in the next window


async def test_admitted_tokens_never_exceed_the_limit_and_a_settlement_frees_the_rest_at_once(
        upstream, start_gateway, http, store_config, clock):
    worst = prompt_upper_bound(CHAT) + CHAT["max_tokens"]
    limit = 2 * worst - 1                                    # two worst cases never fit side by side
    settings = make_settings({"primary": upstream.url}, store=store_config,
                             policies=(rate_policy(tokens=limit),))
    gateway = await start_gateway(settings, clock=clock)
    statuses = []
    for _ in range(12):
        statuses.append((await chat(http, gateway)).status)
        await gateway.app[BUDGET].settled()
    billed = upstream.billed.models["gpt-4.1"]
    used = billed.prompt_tokens + billed.completion_tokens
    assert statuses[:2] == [200, 200]                        # the second fits only once the first gave back
    assert 429 in statuses and used <= limit
    assert used + worst > limit                              # refused only when the next worst case no longer fits


async def test_each_key_has_its_own_window_and_its_own_daily_budget(upstream, start_gateway, http, store_config,
                                                                     clock):
    per_key = rate_policy("per-key", each="key", requests=2)
    budget = Policy(name="per-key-usd", each="key", budgets=(BudgetLimit(period="daily", usd=WORST_USD),))
    settings = with_third_key(make_settings({"primary": upstream.url}, store=store_config, policies=(per_key,)))
    gateway = await start_gateway(settings, clock=clock)
    for key in (CLIENT_KEY, OTHER_KEY, THIRD_KEY):
        assert [(await chat(http, gateway, key)).status for _ in range(3)] == [200, 200, 429]

    settings = dataclasses.replace(settings, policies=(budget,))
    gateway = await start_gateway(settings, clock=clock)
    for key in (CLIENT_KEY, OTHER_KEY, THIRD_KEY):
        first, second = await chat(http, gateway, key), await chat(http, gateway, key)
        await gateway.app[BUDGET].settled()
        assert (first.status, second.status) == (200, 429)   # each key spends its own worst case a day
        assert second.json()["error"]["code"] == "budget_exceeded"


@pytest.fixture
async def held_upstream():
    """An upstream that answers one held request each time the test puts a token in `release`."""
    release: asyncio.Queue[None] = asyncio.Queue()
    arrived = []

    async def answer(request: web.Request) -> web.Response:
        arrived.append(await request.json())
        await release.get()
        return web.json_response({
            "id": "c", "object": "chat.completion", "created": 0, "model": "gpt-4.1",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/v1", release=release, arrived=arrived)
    for _ in range(64):
        release.put_nowait(None)
    await runner.cleanup()


async def test_the_eleventh_request_in_flight_is_refused_at_once_and_the_next_admitted_after_one_ends(
        held_upstream, start_gateway, http, store_config, clock):
    settings = make_settings({"primary": held_upstream.url}, store=store_config,
                             policies=(rate_policy("flight", max_concurrent=10),))
    gateway = await start_gateway(settings, clock=clock)
    held = [asyncio.create_task(chat(http, gateway)) for _ in range(10)]
    while len(held_upstream.arrived) < 10:
        await asyncio.sleep(0.005)   # waiting for the requests we started to reach the upstream
    eleventh = await chat(http, gateway)
    assert eleventh.status == 429 and eleventh.json()["error"]["code"] == "rate_limit_exceeded"
    assert "10 requests in flight" in eleventh.json()["error"]["message"]
    held_upstream.release.put_nowait(None)                   # exactly one finishes
    done, _ = await asyncio.wait(held, return_when=asyncio.FIRST_COMPLETED)
    assert [task.result().status for task in done] == [200]
    await gateway.app[BUDGET].settled()
    admitted = asyncio.create_task(chat(http, gateway))
    while len(held_upstream.arrived) < 11:
        await asyncio.sleep(0.005)
    assert (await chat(http, gateway)).status == 429          # 10 in flight again
    for _ in range(10):
        held_upstream.release.put_nowait(None)
    assert (await admitted).status == 200
    assert [reply.status for reply in await asyncio.gather(*held)] == [200] * 10


async def test_headers_name_the_tightest_limit_on_success_and_on_429(upstream, start_gateway, http, store_config,
                                                                      clock):
    worst = prompt_upper_bound(CHAT) + CHAT["max_tokens"]
    loose = rate_policy("loose", requests=100, tokens=100 * worst)
    tight = rate_policy("tight", requests=2, per="hour", tokens=10 * worst)
    settings = make_settings({"primary": upstream.url}, store=store_config, policies=(loose, tight))
    gateway = await start_gateway(settings, clock=clock)
    first = await chat(http, gateway)
    assert first.status == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"].startswith("1h")
    assert first.headers["x-ratelimit-limit-tokens"] == str(10 * worst)
    assert first.headers["x-ratelimit-remaining-tokens"] == str(9 * worst)
    assert (await chat(http, gateway)).headers["x-ratelimit-remaining-requests"] == "0"
    refused = await chat(http, gateway)
    assert refused.status == 429
    assert refused.headers["x-ratelimit-limit-requests"] == "2"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert 3600 <= int(refused.headers["Retry-After"]) <= 3600 + bucket_ms("hour") / 1000
    assert "policy 'tight' allows 2 requests per hour" in refused.json()["error"]["message"]


async def test_the_sdk_waits_out_a_rate_limit_but_raises_at_once_on_a_budget(upstream, start_gateway, sdk,
                                                                             store_config, clock, monkeypatch):
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:              # the SDK's wait moves the gateway's clock
        waits.append(seconds)
        clock.advance(seconds)

    monkeypatch.setattr(openai._base_client, "anyio", SimpleNamespace(sleep=fake_sleep))
    settings = make_settings({"primary": upstream.url}, store=store_config, policies=(rate_policy(requests=1),))
    gateway = await start_gateway(settings, clock=clock)
    client = sdk(gateway, max_retries=2)                       # the SDK's default
    await client.chat.completions.create(**CHAT)
    answer = await client.chat.completions.with_raw_response.create(**CHAT)
    assert answer.http_response.status_code == 200 and len(waits) == 1 and 55 < waits[0] <= 63

    waits.clear()
    budget = make_policy("tiny", usd=str(WORST_USD))
    gateway = await start_gateway(dataclasses.replace(settings, policies=(budget,)), clock=clock)
    client = sdk(gateway, max_retries=2)
    await client.chat.completions.create(**CHAT)
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(**CHAT)
    assert refused.value.code == "budget_exceeded" and waits == []


async def test_a_provider_at_its_limit_is_skipped_for_the_backup(upstream, backup_upstream, start_gateway, http,
                                                                 store_config, clock):
    settings = make_settings({"primary": upstream.url, "backup": backup_upstream.url}, store=store_config,
                             routes={"gpt-4.1": ["primary", "backup"]})
    primary = dataclasses.replace(settings.providers["primary"], rate_limits=(RateLimit(per="minute", requests=20),))
    settings = dataclasses.replace(settings, providers={**settings.providers, "primary": primary})
    gateway = await start_gateway(settings, clock=clock)
    served = [(await chat(http, gateway)).headers["x-gateway-provider"] for _ in range(21)]
    assert served == ["primary"] * 20 + ["backup"]
    assert (upstream.hits, backup_upstream.hits) == (20, 1)

    backup = dataclasses.replace(settings.providers["backup"], rate_limits=(RateLimit(per="minute", requests=1),))
    settings = dataclasses.replace(settings, providers={**settings.providers, "backup": backup})
    gateway = await start_gateway(settings, clock=clock)
    assert (await chat(http, gateway)).headers["x-gateway-provider"] == "backup"
    refused = await chat(http, gateway)                       # both providers are full for this minute
    assert refused.status == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["Retry-After"]) > 0 and (upstream.hits, backup_upstream.hits) == (20, 2)


class CountingStore:
    """A store that counts the calls made to it, by operation."""

    def __init__(self, store) -> None:
        self.wrapped, self.calls = store, Counter()

    def __getattr__(self, name: str):
        attribute = getattr(self.wrapped, name)
        if name in ("reserve", "reserve_spares", "settle", "release", "record", "read"):
            def counted(*args, **kwargs):
                self.calls[name] += 1
                return attribute(*args, **kwargs)
            return counted
        return attribute


async def test_one_store_call_reserves_and_one_settles_with_budgets_and_rate_limits_on(
        upstream, backup_upstream, start_gateway, http, store_config, clock, tmp_path):
    if store_config.url:
        store = RedisBudgetStore(create_redis_client(store_config.url, 1.0, 16), max_in_flight=16)
    else:
        store = SqliteBudgetStore(store_config.path)
    counting = CountingStore(store)
    policy = rate_policy("everything", each="key", requests=1000, tokens=10**7, max_concurrent=50,
                         budgets=(BudgetLimit(period="daily", usd=Decimal("100")),))
    settings = make_settings({"primary": upstream.url, "backup": backup_upstream.url}, store=store_config,
                             routes={"gpt-4.1": ["primary", "backup"]}, policies=(policy, make_policy("global", usd="100")))
    limited = dataclasses.replace(settings.providers["primary"], rate_limits=(RateLimit(per="second", requests=100),))
    settings = dataclasses.replace(settings, providers={**settings.providers, "primary": limited})
    gateway = await start_gateway(settings, clock=clock, store=counting)
    for stream in (False, True, False, True, False):
        assert (await chat(http, gateway, stream=stream)).status == 200
    await gateway.app[BUDGET].settled()
    assert counting.calls == Counter(reserve=5, settle=5)


async def test_a_minute_window_serves_from_spares_far_from_its_limit_and_admits_exactly_its_limit(
        upstream, start_gateway, http, store_config, clock):
    if store_config.url:
        store = RedisBudgetStore(create_redis_client(store_config.url, 1.0, 16), max_in_flight=16)
    else:
        store = SqliteBudgetStore(store_config.path)
    counting = CountingStore(store)
    limit = 400                                               # spares keep 256 requests of it free (8 replicas' pools)
    policy = rate_policy("rpm", each="key", requests=limit, budgets=(BudgetLimit(period="daily", usd=Decimal("100")),))
    settings = make_settings({"primary": upstream.url}, store=store_config, policies=(policy,))
    gateway = await start_gateway(settings, clock=clock, store=counting)
    engine = gateway.app[BUDGET]

    async def requests(count: int) -> list:
        replies = []
        for _ in range(count):
            replies.append(await chat(http, gateway))
            await engine.quiet()                             # the spares asked for are in before the next one
        return replies

    replies = await requests(5)
    clock.advance(bucket_ms("minute") / 1000)                # the next bucket of the window
    replies += await requests(limit)
    assert [r.status for r in replies] == [200] * limit + [429] * 5 and upstream.hits == limit
    assert counting.calls["reserve"] < limit + 5 - 100        # the first hundred or more were served from spares,
    assert counting.calls["release"] == 1                    # the one left in the first bucket given back at its end,
    remaining = [int(r.headers["x-ratelimit-remaining-requests"]) for r in replies[:limit]]
    assert all(left <= limit - 1 - i for i, left in enumerate(remaining))   # never overstating the window's room,
    assert remaining[:5] == [399, 398, 397, 396, 395]
    assert remaining[-256:] == list(range(255, -1, -1))      # and the last 256 reserved in the store: exact


async def test_a_small_window_never_takes_spares(upstream, start_gateway, http, store_config, clock):
    if store_config.url:
        store = RedisBudgetStore(create_redis_client(store_config.url, 1.0, 16), max_in_flight=16)
    else:
        store = SqliteBudgetStore(store_config.path)
    counting = CountingStore(store)
    settings = make_settings({"primary": upstream.url}, store=store_config, policies=(rate_policy(requests=50),))
    gateway = await start_gateway(settings, clock=clock, store=counting)
    for _ in range(10):
        assert (await chat(http, gateway)).status == 200
        await gateway.app[BUDGET].quiet()
    assert counting.calls["reserve"] == 10                   # 50 is within the 256 kept free of spares
    assert counting.calls["reserve_spares"] <= 10 and counting.calls["release"] == 0


async def test_status_shows_each_windows_use_to_the_admin_and_a_client_its_own(upstream, start_gateway, http,
                                                                             store_config, clock):
    policy = rate_policy("per-key", each="key", requests=5, max_concurrent=3,
                         budgets=(BudgetLimit(period="daily", requests=100),))
    settings = make_settings({"primary": upstream.url}, store=store_config, policies=(policy,))
    provider = dataclasses.replace(settings.providers["primary"], rate_limits=(RateLimit(per="second", requests=50),))
    settings = dataclasses.replace(settings, providers={"primary": provider})
    gateway = await start_gateway(settings, clock=clock)
    for _ in range(2):
        assert (await chat(http, gateway)).status == 200
    assert (await chat(http, gateway, OTHER_KEY)).status == 200

    admin = (await http(gateway, "GET", "/v1/rate_limits/status", key=ADMIN_KEY)).json()["data"]
    windows = {(e.get("value"), e.get("provider"), e["per"]): e for e in admin}
    assert windows[("web-app", None, "minute")]["used"] == 2 and windows[("web-app", None, "minute")]["remaining"] == 3
    assert windows[("batch", None, "minute")]["used"] == 1
    assert windows[("web-app", None, "concurrent")]["used"] == 0
    assert windows[(None, "primary", "second")]["used"] == 3
    mine = (await http(gateway, "GET", "/v1/rate_limits/status")).json()["data"]
    assert {e["value"] for e in mine} == {"web-app"} and not any("provider" in e for e in mine)
    budgets = (await http(gateway, "GET", "/v1/budget/status", key=ADMIN_KEY)).json()["data"]
    assert {(e["value"], e["spent"]) for e in budgets} == {("web-app", 2), ("batch", 1)}

    report = render_rates(admin)
    rows = [line.split() for line in report.splitlines()]
    assert ["per-key", "[key=web-app]", "minute", "requests", "2", "5", "3"] in [row[:7] for row in rows]
    assert ["provider", "primary", "second", "requests", "3", "50", "47"] in [row[:7] for row in rows]
