"""`each: user`: every end user gets their own budget, reserved atomically like any other; a request without
an end user is refused (or shares the `anonymous` user); two replicas on one Redis never let a user overspend."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from decimal import Decimal

import pytest

from gateway.clock import FakeClock
from gateway.config.model import BudgetLimit, ModelPrice, Policy, PolicyMatch, StoreConfig
from gateway.domain.pricing import Usage, cost_nano, nano_to_usd, usd_to_nano
from gateway.domain.tokens import prompt_upper_bound
from gateway.http.appkeys import BUDGET
from gateway.mock_upstream import Action
from tests.support.replicas import two_replicas
from tests.support.settings import ADMIN_KEY, CLIENT_KEY, PRICES, make_settings

CENT = Decimal("0.01")
USER_POLICY = Policy(name="per-user", match=PolicyMatch(keys=("web-app",)), each="user",
                     budgets=(BudgetLimit(period="daily", usd=CENT),))
MESSAGES = [{"role": "user", "content": "one cent each"}]
CHAT = {"model": "gpt-4.1", "messages": MESSAGES, "max_tokens": 500}


def worst_nano(body: dict, price: ModelPrice = PRICES["gpt-4.1"]) -> int:
    return cost_nano(price, Usage(prompt_upper_bound(body), body["max_tokens"]))


@pytest.fixture(params=["embedded", "redis"])
def store_config(request, tmp_path) -> StoreConfig:
    if request.param == "redis":
        return StoreConfig(url=request.getfixturevalue("redis_url"), reserve_ahead=True)
    return StoreConfig(path=str(tmp_path / "budget.db"), reserve_ahead=True)


async def chat(http, gateway, user: str | None, key: str = CLIENT_KEY, **extra):
    body = {**CHAT, **({"user": user} if user else {}), **extra}
    return await http(gateway, "POST", "/v1/chat/completions", json=body, key=key)


async def test_user_a_is_refused_after_their_cent_while_user_b_is_still_served(upstream, start_gateway, http,
                                                                             store_config):
    clock = FakeClock(time.time())                  # near Redis's own clock, which expires the counters
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store_config,
                                                policies=(USER_POLICY,)), clock=clock)
    spend = Action(usage={"completion_tokens": 500, "total_tokens": 506})    # its max_tokens: ~$0.004 a request
    upstream.script(*[spend] * 6)
    answers = [await chat(http, gateway, "alice") for _ in range(5)]
    refused = [reply for reply in answers if reply.status == 429]
    assert [reply.status for reply in answers] == [200, 200, 429, 429, 429]
    assert refused[0].json()["error"]["code"] == "budget_exceeded"
    assert "per-user" in refused[0].json()["error"]["message"]
    assert (await chat(http, gateway, "bob")).status == 200

    await gateway.app[BUDGET].settled()
    status = await http(gateway, "GET", "/v1/budget/status?user=alice", key=ADMIN_KEY)
    [alice] = [e for e in status.json()["data"] if e["unit"] == "usd"]
    assert alice["each"] == "user" and alice["value"] == "alice"
    assert Decimal(alice["spent"]) <= CENT < Decimal(alice["spent"]) + nano_to_usd(worst_nano(CHAT))

    clock.advance(86_400)                           # a new day: alice's cent is back
    assert (await chat(http, gateway, "alice")).status == 200


async def test_a_request_without_an_end_user_is_a_clear_400_or_counts_as_anonymous(upstream, start_gateway, http):
    refusing = await start_gateway(make_settings({"primary": upstream.url}, policies=(USER_POLICY,)))
    reply = await chat(http, refusing, None)
    assert reply.status == 400
    error = reply.json()["error"]
    assert error["code"] == "end_user_required" and error["param"] == "user"
    assert "x-gateway-user" in error["message"] and upstream.hits == 0

    sharing = dataclasses.replace(USER_POLICY, without_user="anonymous")
    gateway = await start_gateway(make_settings({"primary": upstream.url}, policies=(sharing,)))
    assert (await chat(http, gateway, None)).status == 200
    await gateway.app[BUDGET].settled()
    status = (await http(gateway, "GET", "/v1/budget/status?user=anonymous", key=ADMIN_KEY)).json()["data"]
    assert status[0]["value"] == "anonymous" and status[0]["spent"] != "0"


async def test_the_header_names_the_user_a_budget_counts(upstream, start_gateway, http):
    gateway = await start_gateway(make_settings({"primary": upstream.url}, policies=(USER_POLICY,)))
    reply = await http(gateway, "POST", "/v1/chat/completions", json={**CHAT, "user": "ignored"},
                       headers={"x-gateway-user": "dora"})
    assert reply.status == 200
    await gateway.app[BUDGET].settled()
    [dora] = (await http(gateway, "GET", "/v1/budget/status?user=dora", key=ADMIN_KEY)).json()["data"]
    [ignored] = (await http(gateway, "GET", "/v1/budget/status?user=ignored", key=ADMIN_KEY)).json()["data"]
    assert dora["spent"] != "0" and ignored["spent"] == "0"


# --- two replicas, one real Redis ---

REPLICA_CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "share the cent"}], "max_tokens": 100,
                "stream": True}
REPLICA_PRICE = ModelPrice(Decimal("2.00"), Decimal("8.00"), max_output_tokens=100)   # tests.support.replicas
USERS, CLIENTS = 10, 200


@pytest.fixture
async def replicas(tmp_path, upstream, redis_url):
    policy = ("per-user", "name: per-user\neach: user\nbudgets:\n  - {period: daily, usd: 0.01}\n")
    async with two_replicas(tmp_path, redis_url, upstream.url, policy) as running:
        yield running


async def test_two_replicas_200_concurrent_requests_across_10_users_no_user_overspends(replicas, upstream):
    session, urls = replicas
    upstream.stream_gate = asyncio.Event()          # admitted requests hold their reservation until all are decided
    decided: list[int] = []
    all_decided = asyncio.Event()

    async def client(i: int) -> tuple[str, int]:
        user = f"user-{i % USERS}"
        async with session.post(urls[i % 2] + "/v1/chat/completions", json={**REPLICA_CHAT, "user": user},
                                headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as response:
            decided.append(response.status)
            if len(decided) == CLIENTS:
                all_decided.set()
            await response.read()
            return user, response.status

    tasks = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
    await asyncio.wait_for(all_decided.wait(), timeout=60)
    upstream.stream_gate.set()
    results = await asyncio.gather(*tasks)

    worst = worst_nano({**REPLICA_CHAT, "user": "user-0"}, REPLICA_PRICE)
    fits = usd_to_nano(CENT) // worst
    assert 0 < fits < CLIENTS // USERS              # the cent binds: every user is refused some requests
    for u in range(USERS):
        statuses = [status for user, status in results if user == f"user-{u}"]
        assert statuses.count(200) == fits and statuses.count(429) == len(statuses) - fits
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for u in range(USERS):
        for _ in range(200):
            async with session.get(urls[u % 2] + f"/v1/budget/status?user=user-{u}", headers=headers) as r:
                [entry] = (await r.json())["data"]
            if Decimal(entry["reserved"]) == 0:
                break
            await asyncio.sleep(0.025)              # settling follows the last byte sent, on the other replica
        assert Decimal(entry["reserved"]) == 0 and 0 < Decimal(entry["spent"]) <= CENT
