"""Budgets through the real gateway: refusals, settlement, downgrade, status scoping, restarts."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime, timezone
from decimal import Decimal

import openai
import pytest

from gateway.budget import redis_batch
from gateway.clock import FakeClock
from gateway.config.model import StoreConfig
from gateway.domain.pricing import Usage, cost_nano, nano_to_usd
from gateway.http.appkeys import BUDGET
from tests.support.settings import ADMIN_KEY, CLIENT_KEY, OTHER_KEY, PRICES, make_policy, make_settings

MESSAGES = [{"role": "user", "content": "Count the budget"}]
CHAT = {"model": "gpt-4.1", "messages": MESSAGES, "max_tokens": 10}
NOON_UTC = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc).timestamp()


def billed_cost(upstream, model: str) -> Decimal:
    billed = upstream.billed.models[model]
    return nano_to_usd(cost_nano(PRICES[model], Usage(billed.prompt_tokens, billed.completion_tokens,
                                                      billed.cached_tokens)))


async def status(http, gateway, key=ADMIN_KEY, policy=None) -> dict[tuple[str, str, str], dict]:
    path = "/v1/budget/status" + (f"?policy={policy}" if policy else "")
    reply = await http(gateway, "GET", path, key=key)
    assert reply.status == 200, reply.body
    return {(e["policy"], e["period"], e["unit"]): e for e in reply.json()["data"]}


async def test_spend_settles_to_the_real_cost_and_nothing_stays_reserved(upstream, start_gateway, http,
                                                                         store_config):
    settings = make_settings({"primary": upstream.url}, store=store_config,
                             policies=(make_policy("global", usd="10", tokens=100_000, requests=100),))
    gateway = await start_gateway(settings)
    for _ in range(3):
        assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200

    entries = await status(http, gateway)
    usd = entries[("global", "daily", "usd")]
    assert Decimal(usd["spent"]) == billed_cost(upstream, "gpt-4.1") > 0
    assert Decimal(usd["reserved"]) == 0
    assert entries[("global", "daily", "requests")]["spent"] == 3
    billed = upstream.billed.models["gpt-4.1"]
    assert entries[("global", "daily", "tokens")]["spent"] == billed.prompt_tokens + billed.completion_tokens


async def test_a_status_read_does_not_wait_for_settlements_waiting_to_share_a_write(
        upstream, start_gateway, http, redis_url, monkeypatch):
    monkeypatch.setattr(redis_batch, "LAZY_FLUSH_S", 60.0)   # a settlement would wait a minute for company
    settings = make_settings({"primary": upstream.url}, store=StoreConfig(url=redis_url, reserve_ahead=False),
                             policies=(make_policy("global", usd="10"),))
    gateway = await start_gateway(settings)
    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    async with asyncio.timeout(5):
        usd = (await status(http, gateway))[("global", "daily", "usd")]
    assert Decimal(usd["spent"]) == billed_cost(upstream, "gpt-4.1") > 0 and Decimal(usd["reserved"]) == 0


async def test_refusal_is_a_429_that_sdks_do_not_retry_and_names_policy_period_limit_reset(
        upstream, start_gateway, http, sdk, store_config):
    clock = FakeClock(NOON_UTC)
    policy = make_policy("team-web", requests=1, timezone="Asia/Ho_Chi_Minh", teams=("web",))
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store_config,
                                                policies=(policy,)), clock=clock)
    client = sdk(gateway, max_retries=3)
    await client.chat.completions.create(**CHAT)
    hits = upstream.hits

    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(**CHAT)

    assert upstream.hits == hits  # no upstream call for the refused request
    response = refused.value.response
    assert response.headers["x-should-retry"] == "false"
    # 12:00 UTC is 19:00 in Ho Chi Minh City (UTC+7): the local day resets in 5 hours.
    assert int(response.headers["retry-after"]) == 5 * 3600
    error = refused.value.body
    assert error["code"] == "budget_exceeded" and error["type"] == "budget_exceeded"
    for part in ("team-web", "daily", "1 requests", "2026-11-23T00:00:00+07:00"):
        assert part in error["message"]


async def test_the_sdk_over_budget_raises_at_once_with_one_gateway_request(upstream, start_gateway, sdk,
                                                                         store_config, caplog):
    import logging
    caplog.set_level(logging.INFO, "gateway.access")
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store_config,
                                                policies=(make_policy("tiny", usd="0.000001"),)))
    with pytest.raises(openai.RateLimitError):
        await sdk(gateway, max_retries=5).chat.completions.create(**CHAT)
    assert len([r for r in caplog.records if r.name == "gateway.access"]) == 1
    assert upstream.hits == 0


async def test_a_refusal_by_one_policy_leaves_the_others_untouched(upstream, start_gateway, http, store_config):
    policies = (make_policy("global", usd="100"), make_policy("team-web", tokens=100_000, teams=("web",)),
                make_policy("gpt41-cap", usd="0.000001", models=("gpt-4.1",)))
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store_config, policies=policies))

    reply = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)

    assert reply.status == 429 and "gpt41-cap" in reply.json()["error"]["message"]
    entries = await status(http, gateway)
    for key in [("global", "daily", "usd"), ("team-web", "daily", "tokens")]:
        assert entries[key]["spent"] in (0, "0") and entries[key]["reserved"] in (0, "0"), key


async def test_downgrade_serves_the_cheaper_model_when_the_policy_is_spent(upstream, start_gateway, http,
                                                                          store_config):
    policy = make_policy("web-gpt41", requests=1, models=("gpt-4.1",), downgrade_to="gpt-4o-mini")
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store_config,
                                                policies=(policy,)))
    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    reply = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)

    assert reply.status == 200
    assert upstream.requests[-1].json["model"] == "gpt-4o-mini"
    assert upstream.billed.models["gpt-4o-mini"].requests == 1


async def test_status_is_scoped_to_the_callers_own_policies(upstream, start_gateway, http, store_config):
    policies = (make_policy("global", usd="100"), make_policy("team-web", usd="10", teams=("web",)),
                make_policy("team-data", usd="10", teams=("data",)))
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store_config, policies=policies))

    mine = await status(http, gateway, key=CLIENT_KEY)
    assert {name for name, _, _ in mine} == {"global", "team-web"}
    theirs = await http(gateway, "GET", "/v1/budget/status?policy=team-data", key=CLIENT_KEY)
    missing = await http(gateway, "GET", "/v1/budget/status?policy=no-such-policy", key=CLIENT_KEY)
    assert theirs.status == missing.status == 404
    assert theirs.json()["error"]["message"].replace("team-data", "X") == \
        missing.json()["error"]["message"].replace("no-such-policy", "X")
    assert {name for name, _, _ in await status(http, gateway, key=OTHER_KEY)} == {"global", "team-data"}
    assert {name for name, _, _ in await status(http, gateway)} == {"global", "team-web", "team-data"}
    entry = (await status(http, gateway, key=CLIENT_KEY, policy="team-web"))[("team-web", "daily", "usd")]
    assert set(entry) >= {"limit", "spent", "reserved", "remaining", "utilization", "window_start",
                          "resets_at", "state"}


async def test_embedded_counters_survive_a_gateway_restart(upstream, start_gateway, http, tmp_path):
    store = StoreConfig(path=str(tmp_path / "durable.db"))
    settings = make_settings({"primary": upstream.url}, store=store, policies=(make_policy("global", requests=10),))
    first = await start_gateway(settings)
    assert (await http(first, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    await first.server.close()

    second = await start_gateway(settings)
    assert (await status(http, second))[("global", "daily", "requests")]["spent"] == 1


async def test_concurrent_requests_never_overspend(upstream, start_gateway, http, store_config):
    """Two gateway replicas in one loop, one store: exactly floor(B / W) served."""
    settings = make_settings({"primary": upstream.url}, store=store_config,
                             policies=(make_policy("global", requests=37),))
    replicas = [await start_gateway(settings), await start_gateway(settings)]
    replies = await asyncio.gather(*(http(replicas[i % 2], "POST", "/v1/chat/completions", json=CHAT)
                                     for i in range(120)))
    assert sorted({r.status for r in replies}) == [200, 429]
    assert sum(r.status == 200 for r in replies) == 37 == upstream.hits
    for replica in replicas:   # each replica settles in the background after answering
        await replica.app[BUDGET].settled()
    entry = (await status(http, replicas[0]))[("global", "daily", "requests")]
    assert (entry["spent"], entry["reserved"]) == (37, 0)


async def test_a_truncated_stream_is_charged_its_partial_usage_and_releases_the_rest(upstream, start_gateway,
                                                                                     http, store_config):
    from gateway.mock_upstream import Action
    from gateway.domain.tokens import prompt_upper_bound
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store_config,
                                                policies=(make_policy("global", usd="10"),)))
    upstream.script(Action(truncate_after=2))
    body = {**CHAT, "stream": True}
    reply = await http(gateway, "POST", "/v1/chat/completions", json=body)

    assert reply.status == 200 and b"stream_truncated" in reply.body and b"[DONE]" not in reply.body
    partial = Usage(prompt_tokens=prompt_upper_bound(body), completion_tokens=2, estimated=True)
    usd = (await status(http, gateway))[("global", "daily", "usd")]
    assert Decimal(usd["spent"]) == nano_to_usd(cost_nano(PRICES["gpt-4.1"], partial))
    assert Decimal(usd["reserved"]) == 0
