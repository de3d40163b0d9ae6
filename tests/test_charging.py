"""However a request ends, what was served is charged: disconnects, odd upstreams, store blips."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.budget.sqlite_store import SqliteBudgetStore
from gateway.domain.pricing import Usage, cost_nano, nano_to_usd
from gateway.domain.tokens import prompt_upper_bound
from gateway.errors import StoreError
from gateway.mock_upstream import Action
from tests.support.settings import ADMIN_KEY, CLIENT_KEY, PRICES, make_policy, make_settings

CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "charge me fairly"}], "max_tokens": 7}
POLICY = (make_policy("global", usd="10"),)


async def settled(http, gateway) -> dict:
    """The global usd window once no reservation is in flight (settling can outlive the client)."""
    for _ in range(200):
        [entry] = [e for e in (await http(gateway, "GET", "/v1/budget/status", key=ADMIN_KEY)).json()["data"]
                   if e["unit"] == "usd"]
        if Decimal(entry["reserved"]) == 0:
            return entry
        await asyncio.sleep(0.02)
    pytest.fail(f"the reservation was never settled: {entry}")


def usd(usage: Usage) -> Decimal:
    return nano_to_usd(cost_nano(PRICES["gpt-4.1"], usage))


@pytest.fixture
async def raw_upstream():
    """Serve one handler as an OpenAI-compatible upstream; yields a factory returning its /v1 URL."""
    servers: list[TestServer] = []

    async def serve(handler) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("/v1"))

    yield serve
    for server in servers:
        await server.close()


async def test_a_client_that_leaves_mid_stream_is_charged_what_was_streamed(upstream, start_gateway, http):
    gateway = await start_gateway(make_settings({"primary": upstream.url}, policies=POLICY))
    upstream.stream_gate = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                                headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as response:
            assert b"data:" in await response.content.readline()
    # The client is gone while the upstream still holds the rest of the answer.
    entry = await settled(http, gateway)
    upstream.stream_gate.set()
    assert Decimal(entry["spent"]) >= usd(Usage(prompt_upper_bound(CHAT), 1)) > 0


async def test_a_client_that_gives_up_while_the_upstream_works_is_charged_the_worst_case(upstream, start_gateway,
                                                                                        http):
    gateway = await start_gateway(make_settings({"primary": upstream.url}, policies=POLICY))
    upstream.script(Action(hang=True))
    with pytest.raises(asyncio.TimeoutError):
        await http(gateway, "POST", "/v1/chat/completions", json=CHAT, timeout=aiohttp.ClientTimeout(total=0.3))
    entry = await settled(http, gateway)
    assert Decimal(entry["spent"]) == usd(Usage(prompt_upper_bound(CHAT), CHAT["max_tokens"]))


async def test_an_answer_without_usage_is_charged_the_worst_case(raw_upstream, start_gateway, http):
    async def no_usage(request: web.Request) -> web.Response:
        return web.json_response({"id": "x", "object": "chat.completion", "model": "gpt-4.1",
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]})
    gateway = await start_gateway(make_settings({"primary": await raw_upstream(no_usage)}, policies=POLICY))
    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    entry = await settled(http, gateway)
    assert Decimal(entry["spent"]) == usd(Usage(prompt_upper_bound(CHAT), CHAT["max_tokens"]))


@pytest.mark.parametrize("ending", [b"\n", b"\r", b"\r\n"])
async def test_the_last_event_and_any_line_ending_reach_the_client(raw_upstream, start_gateway, http, ending):
    chunk = b'{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}'
    usage = b'{"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}'

    async def quirky(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in (chunk, usage):
            await response.write(b"data: " + event + ending + ending)
        await response.write(b"data: [DONE]" + ending)      # no blank line before the end
        return response

    gateway = await start_gateway(make_settings({"primary": await raw_upstream(quirky)}, policies=POLICY))
    reply = await http(gateway, "POST", "/v1/chat/completions", json={**CHAT, "stream": True})
    assert reply.body.count(b"data: ") == 2 and reply.body.endswith(b"data: [DONE]\n\n")
    assert b"stream_truncated" not in reply.body
    assert Decimal((await settled(http, gateway))["spent"]) == usd(Usage(3, 1))


class BlinkingStore(SqliteBudgetStore):
    """A store whose first reserve fails, like a Redis that paused once for a fork."""

    failed = False

    async def reserve(self, *args, **kwargs):
        if not self.failed:
            self.failed = True
            raise StoreError("one slow call")
        return await super().reserve(*args, **kwargs)


async def test_one_store_error_is_not_an_outage(upstream, start_gateway, http, tmp_path):
    gateway = await start_gateway(make_settings({"primary": upstream.url}, policies=POLICY),
                                  store=BlinkingStore(str(tmp_path / "blink.db")))
    first = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)
    second = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)
    assert (first.status, second.status) == (503, 200)
