"""An upstream redirect is never followed: the host it names receives nothing, the request fails over or
gets a 502 in OpenAI's shape, the redirecting provider's breaker counts a failure, and nothing is charged
for the redirect."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config.model import BreakerConfig, RetryConfig
from gateway.domain.pricing import Usage, cost_nano, nano_to_usd
from gateway.http.appkeys import RESILIENCE
from gateway.mock_upstream import Action, MockUpstream
from gateway.resilience.breaker import BreakerState
from tests.support.settings import ADMIN_KEY, PRICES, make_policy, make_settings

HEADER_SECRET = "hdr-SECRET-redirect-0042"
REDIRECTS = (301, 302, 303, 307, 308)
REQUESTS = {
    "chat": ("/v1/chat/completions", {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi there"}],
                                      "max_tokens": 5}),
    "stream": ("/v1/chat/completions", {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi there"}],
                                        "max_tokens": 5, "stream": True}),
    "embeddings": ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi there"}),
}


class Stranger:
    """A host no provider is configured on: records every request that reaches it, answers like a provider."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str, dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((request.method, request.path, dict(request.headers), await request.read()))
        return web.json_response({"object": "chat.completion", "model": "gpt-4.1", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "from a stranger"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})


@pytest.fixture
async def stranger() -> AsyncIterator[tuple[Stranger, str]]:
    """The stranger and its base URL."""
    host = Stranger()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", host.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield host, str(server.make_url("")).rstrip("/")
    await server.close()


async def no_sleep(_seconds: float) -> None:
    """The gateway's retry sleep, without the wait."""


def settings_for(*mocks: MockUpstream, **overrides: Any):
    """The mocks as providers, the first one sending a secret `api-key` header; one USD policy."""
    settings = make_settings({mock.name: mock.url for mock in mocks}, policies=(make_policy("global", usd="10"),),
                             retry=RetryConfig(max_retries=2), **overrides)
    first = mocks[0].name
    providers = {**settings.providers, first: dataclasses.replace(
        settings.providers[first], headers=(("api-key", HEADER_SECRET),))}
    return dataclasses.replace(settings, providers=providers)


def redirect(status: int, stranger_url: str, path: str) -> Action:
    return Action(status=status, headers={"Location": stranger_url + path})


async def settled(http, gateway) -> Decimal:
    """USD spent on the global policy once nothing is reserved any more."""
    for _ in range(200):
        [entry] = [e for e in (await http(gateway, "GET", "/v1/budget/status", key=ADMIN_KEY)).json()["data"]
                   if e["unit"] == "usd"]
        if Decimal(entry["reserved"]) == 0:
            return Decimal(entry["spent"])
        await asyncio.sleep(0.02)
    pytest.fail(f"the reservation was never settled: {entry}")


def served_cost(mock: MockUpstream, model: str) -> Decimal:
    """What the mock's one answer costs: the usage it reported, at the model's price."""
    reported = mock.usage_for(mock.requests[-1].json)
    usage = Usage(reported["prompt_tokens"], reported.get("completion_tokens", 0))
    return nano_to_usd(cost_nano(PRICES[model], usage))


@pytest.mark.parametrize("kind", REQUESTS)
@pytest.mark.parametrize("status", REDIRECTS)
async def test_a_redirect_fails_over_at_once_and_the_stranger_gets_nothing(
        upstream, backup_upstream, stranger, start_gateway, http, status, kind):
    host, stranger_url = stranger
    path, body = REQUESTS[kind]
    gateway = await start_gateway(settings_for(upstream, backup_upstream), sleep=no_sleep)
    upstream.script(redirect(status, stranger_url, path))

    reply = await http(gateway, "POST", path, json=body)

    assert reply.status == 200 and reply.headers["x-gateway-provider"] == "backup"
    assert b"from a stranger" not in reply.body
    assert host.received == []
    assert upstream.hits == 1 and backup_upstream.hits == 1         # a redirect is not retried
    assert await settled(http, gateway) == served_cost(backup_upstream, body["model"])


@pytest.mark.parametrize("kind", REQUESTS)
@pytest.mark.parametrize("status", REDIRECTS)
async def test_a_redirect_without_a_backup_is_a_502_and_costs_nothing(
        upstream, stranger, start_gateway, http, status, kind):
    host, stranger_url = stranger
    path, body = REQUESTS[kind]
    gateway = await start_gateway(settings_for(upstream), sleep=no_sleep)
    upstream.always(redirect(status, stranger_url, path))

    reply = await http(gateway, "POST", path, json=body)

    assert reply.status == 502
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "upstream_error"
    assert f"redirect ({status})" in error["message"] and stranger_url not in reply.body.decode()
    assert "location" not in reply.headers
    assert host.received == [] and upstream.hits == 1
    assert await settled(http, gateway) == 0


async def test_a_redirect_counts_against_the_providers_breaker(
        upstream, backup_upstream, stranger, start_gateway, http):
    _, stranger_url = stranger
    breaker = BreakerConfig(consecutive_failures=2, min_calls=10_000, open_s=60)
    gateway = await start_gateway(settings_for(upstream, backup_upstream, breaker=breaker), sleep=no_sleep)
    upstream.always(redirect(302, stranger_url, "/v1/chat/completions"))
    path, body = REQUESTS["chat"]

    for _ in range(3):
        assert (await http(gateway, "POST", path, json=body)).headers["x-gateway-provider"] == "backup"

    assert gateway.app[RESILIENCE].breaker("primary").state is BreakerState.OPEN
    assert upstream.hits == 2 and backup_upstream.hits == 3          # the open breaker skips the primary
