"""Two gateway processes on one real Redis (or a three-master Cluster) share one rate window.

Real processes read the real clock: the 300 requests all land well within one minute. That the
Retry-After told to the refused ones lets them through is shown with an injected clock in
tests/test_rate_limits.py (two gateways on one store, every backend).
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support.replicas import two_replicas
from tests.support.settings import CLIENT_KEY

CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "one of many"}], "max_tokens": 5}
CLIENTS = 300
PER_MINUTE = 50


@pytest.fixture
async def replicas(tmp_path, upstream, request):
    policy = ("rpm", f"name: rpm\nrate_limits:\n  - {{per: minute, requests: {PER_MINUTE}}}\n")
    async with two_replicas(tmp_path, request.getfixturevalue(request.param), upstream.url, policy) as running:
        yield running


@pytest.mark.parametrize("replicas", ["redis_url", "redis_cluster_url"], indirect=True)
async def test_300_concurrent_requests_through_two_processes_get_exactly_the_minutes_50(replicas, upstream):
    session, urls = replicas

    async def client(i: int) -> tuple[int, dict, dict]:
        async with session.post(urls[i % 2] + "/v1/chat/completions", json=CHAT,
                                headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as response:
            return response.status, dict(response.headers), await response.json()

    replies = await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    statuses = [status for status, _, _ in replies]
    assert statuses.count(200) == PER_MINUTE and statuses.count(429) == CLIENTS - PER_MINUTE
    assert upstream.hits == PER_MINUTE
    refused = [(headers, body) for status, headers, body in replies if status == 429]
    assert {body["error"]["code"] for _, body in refused} == {"rate_limit_exceeded"}
    assert {headers["x-should-retry"] for headers, _ in refused} == {"true"}
    assert all(1 <= int(headers["Retry-After"]) <= 63 for headers, _ in refused)
    served = [headers for status, headers, _ in replies if status == 200]
    assert min(int(headers["x-ratelimit-remaining-requests"]) for headers in served) == 0
