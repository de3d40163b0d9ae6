"""Two gateway processes sharing one real Redis (or a three-master Cluster) never overspend."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import aiohttp
import pytest

from gateway.config.model import ModelPrice
from gateway.domain.pricing import Usage, cost_nano, nano_to_usd
from gateway.domain.tokens import prompt_upper_bound
from tests.support.replicas import two_replicas
from tests.support.settings import ADMIN_KEY, CLIENT_KEY

PRICE = ModelPrice(Decimal("2.00"), Decimal("8.00"), max_output_tokens=100)
CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "spend carefully"}], "max_tokens": 5,
        "stream": True}
CLIENTS = 300
SERVED_BUDGET = 10   # B = 10.5 W, so exactly floor(B / W) = 10 requests fit


def worst_case_nano() -> int:
    return cost_nano(PRICE, Usage(prompt_upper_bound(CHAT), CHAT["max_tokens"]))


async def settled_status(session: aiohttp.ClientSession, url: str) -> dict:
    """The global window once every reservation is settled (settling follows the last byte sent)."""
    for _ in range(200):
        async with session.get(url + "/v1/budget/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
            [entry] = (await r.json())["data"]
        if Decimal(entry["reserved"]) == 0:
            return entry
        await asyncio.sleep(0.025)
    pytest.fail(f"reservations never returned to 0: {entry}")


@pytest.fixture
async def replicas(tmp_path, upstream, request):
    budget = nano_to_usd(worst_case_nano() * SERVED_BUDGET + worst_case_nano() // 2)
    policy = ("global", f"name: global\nbudgets:\n  - {{period: daily, usd: {budget}}}\n")
    async with two_replicas(tmp_path, request.getfixturevalue(request.param), upstream.url, policy) as (session, urls):
        yield session, urls, budget


@pytest.mark.parametrize("replicas", ["redis_url", "redis_cluster_url"], indirect=True)
async def test_300_concurrent_requests_through_two_processes_serve_exactly_floor_b_over_w(replicas, upstream):
    session, urls, budget = replicas
    upstream.stream_gate = asyncio.Event()          # admitted requests hold their reservation until all are decided
    decided: list[int] = []
    all_decided = asyncio.Event()

    async def client(i: int) -> int:
        async with session.post(urls[i % 2] + "/v1/chat/completions", json=CHAT,
                                headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as response:
            decided.append(response.status)
            if len(decided) == CLIENTS:
                all_decided.set()
            await response.read()
            return response.status

    tasks = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
    await asyncio.wait_for(all_decided.wait(), timeout=60)
    upstream.stream_gate.set()
    statuses = await asyncio.gather(*tasks)

    assert statuses.count(200) == SERVED_BUDGET and statuses.count(429) == CLIENTS - SERVED_BUDGET
    assert upstream.hits == SERVED_BUDGET
    entry = await settled_status(session, urls[0])
    billed = upstream.billed.models["gpt-4.1"]
    mock_billing = nano_to_usd(cost_nano(PRICE, Usage(billed.prompt_tokens, billed.completion_tokens)))
    assert Decimal(entry["spent"]) == mock_billing <= budget
    assert Decimal(entry["reserved"]) == 0
