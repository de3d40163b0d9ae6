"""Runaway streams stop: at the output the request reserved, at the cost it reserved, or at `stream_s`.

The gateway counts a stream's output as it relays it (usage chunks when the upstream sends them along,
else one token per output event), ends it with an SSE error event, closes the upstream connection and
charges what was delivered, never more than the reservation. Streams that keep within their request are
relayed untouched, however their role, finish and filter chunks fall.
"""

from __future__ import annotations

import asyncio
import dataclasses
from decimal import Decimal
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.domain.pricing import Usage, cost_nano, nano_to_usd
from gateway.domain.tokens import prompt_upper_bound
from gateway.http.appkeys import BUDGET
from gateway.mock_upstream import Action
from tests.support.metrics import RecordingLog
from tests.support.settings import ADMIN_KEY, PRICES, make_policy, make_settings

MESSAGES = [{"role": "user", "content": "never stop talking"}]
CHAT = {"model": "gpt-4.1", "messages": MESSAGES, "max_tokens": 10, "stream": True}


def worst_usd(body: dict[str, Any], output: int) -> Decimal:
    return nano_to_usd(cost_nano(PRICES["gpt-4.1"], Usage(prompt_upper_bound(body), output)))


def events(body: bytes) -> list[Any]:
    """The JSON of every data event of an SSE body ([DONE] as the string)."""
    datas = [event.removeprefix(b"data: ") for event in body.split(b"\n\n") if event.startswith(b"data: ")]
    return [data.decode() if data == b"[DONE]" else orjson.loads(data) for data in datas]


def output_events(body: bytes) -> int:
    return sum(1 for e in events(body) if isinstance(e, dict) and any(
        (c.get("delta") or {}).get("content") or c.get("text") for c in e.get("choices") or []))


async def spent_usd(http, gateway) -> Decimal:
    await gateway.app[BUDGET].settled()
    reply = await http(gateway, "GET", "/v1/budget/status", key=ADMIN_KEY)
    [entry] = [e for e in reply.json()["data"] if e["unit"] == "usd"]
    assert Decimal(entry["reserved"]) == 0
    return Decimal(entry["spent"])


@pytest.fixture
async def raw_upstream():
    """Serve one SSE handler as an OpenAI-compatible upstream; yields a factory returning its /v1 URL."""
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


def sse_upstream(*chunks: dict[str, Any], comments: bool = False):
    """A handler streaming `chunks` (each after an SSE comment line, if asked) then [DONE]."""
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in chunks:
            await response.write((b": keep-alive\n\n" if comments else b"") + b"data: " + orjson.dumps(chunk) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response
    return handler


def chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0, **extra: Any) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk",
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}], **extra}


async def test_an_endless_stream_stops_at_its_reserved_output(upstream, start_gateway, http) -> None:
    log = RecordingLog()
    gateway = await start_gateway(make_settings({"primary": upstream.url}, policies=(make_policy("g", usd="10"),)),
                                  access_log=log)
    upstream.script(Action(endless=True))

    reply = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)

    assert reply.status == 200
    assert output_events(reply.body) <= CHAT["max_tokens"] + 1
    assert events(reply.body)[-1]["error"]["code"] == "stream_budget_exhausted"
    assert b"[DONE]" not in reply.body
    await asyncio.wait_for(upstream.stream_abandoned.wait(), 5)   # the gateway closed the upstream connection
    assert 0 < await spent_usd(http, gateway) <= worst_usd(CHAT, CHAT["max_tokens"])
    [record] = [r for r in log.records if r.path == "/v1/chat/completions"]
    assert record.error == "stream_budget_exhausted" and record.usage is not None and record.usage.estimated


async def test_an_endless_legacy_completions_stream_stops_too(upstream, start_gateway, http) -> None:
    gateway = await start_gateway(make_settings({"primary": upstream.url}, routes={"gpt-4.1": ["primary"]}))
    upstream.script(Action(endless=True))
    body = {"model": "gpt-4.1", "prompt": "never stop", "max_tokens": 2, "n": 2, "stream": True}

    reply = await http(gateway, "POST", "/v1/completions", json=body)

    assert output_events(reply.body) <= 2 * 2 + 1
    assert events(reply.body)[-1]["error"]["code"] == "stream_budget_exhausted"
    await asyncio.wait_for(upstream.stream_abandoned.wait(), 5)


async def test_the_sdk_raises_the_stream_budget_error_after_the_reserved_output(upstream, start_gateway, sdk) -> None:
    gateway = await start_gateway(make_settings({"primary": upstream.url}))      # no policy: the bound still holds
    upstream.script(Action(endless=True))
    stream = await sdk(gateway).chat.completions.create(model="gpt-4.1", messages=MESSAGES, max_tokens=3,
                                                        stream=True)
    received = []
    with pytest.raises(openai.APIError) as raised:
        async for part in stream:
            received.append(part)
    assert raised.value.body["code"] == "stream_budget_exhausted"
    assert len(received) <= 4
    await asyncio.wait_for(upstream.stream_abandoned.wait(), 5)


async def test_a_policy_output_cap_bounds_a_stream_without_max_tokens(upstream, start_gateway, http) -> None:
    policy = dataclasses.replace(make_policy("g", usd="10"), max_output_tokens=4)
    gateway = await start_gateway(make_settings({"primary": upstream.url}, policies=(policy,)))
    upstream.script(Action(endless=True))
    body = {**CHAT, "max_tokens": None}

    reply = await http(gateway, "POST", "/v1/chat/completions", json=body)

    assert output_events(reply.body) <= 4 + 1
    assert events(reply.body)[-1]["error"]["code"] == "stream_budget_exhausted"
    assert await spent_usd(http, gateway) <= worst_usd(body, 4)


async def test_a_slow_endless_stream_stops_at_stream_s(upstream, start_gateway, http) -> None:
    settings = make_settings({"primary": upstream.url}, policies=(make_policy("g", usd="10"),))
    primary = settings.providers["primary"]
    timeouts = dataclasses.replace(primary.timeouts, stream_s=0.3)
    settings = dataclasses.replace(settings, providers={"primary": dataclasses.replace(primary, timeouts=timeouts)})
    gateway = await start_gateway(settings)
    upstream.script(Action(endless=True, event_interval_s=0.02))
    body = {**CHAT, "max_tokens": 100_000}

    reply = await http(gateway, "POST", "/v1/chat/completions", json=body)

    assert events(reply.body)[-1]["error"]["code"] == "stream_timeout"
    assert 1 < output_events(reply.body) < 100
    await asyncio.wait_for(upstream.stream_abandoned.wait(), 5)
    assert 0 < await spent_usd(http, gateway) <= worst_usd(body, 100_000)


ROLE, FINISH = {"role": "assistant", "content": ""}, {}
WORDS = [{"content": f" w{i}"} for i in range(10)]
WITHIN = {   # max_tokens=10 (n=2: 5 each)
    "openai: role, 10 tokens, finish, usage": [
        chunk(ROLE), *[chunk(w) for w in WORDS], chunk(FINISH, "length"),
        {"id": "c", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 10, "total_tokens": 19}}],
    "azure: filter results first and last": [
        {"id": "", "choices": [], "prompt_filter_results": [{"prompt_index": 0}]}, chunk(ROLE),
        *[chunk(w) for w in WORDS], chunk(FINISH, "length"),
        chunk({}, content_filter_results={"hate": {"filtered": False}})],
    "n=2: two choices of 5 tokens": [
        chunk(ROLE), chunk(ROLE, index=1), *[chunk(w, index=i % 2) for i, w in enumerate(WORDS)],
        chunk(FINISH, "length"), chunk(FINISH, "length", index=1)],
    "the last token and the finish together": [*[chunk(w) for w in WORDS[:9]], chunk(WORDS[9], "length")],
    "tool call arguments": [chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "t", "type": "function",
                                   "function": {"name": "f", "arguments": ""}}]}),
                            *[chunk({"tool_calls": [{"index": 0, "function": {"arguments": "x"}}]})] * 9,
                            chunk(FINISH, "tool_calls")],
    "keep-alive comments": [chunk(w) for w in WORDS],
}


@pytest.mark.parametrize("shape", WITHIN)
async def test_a_stream_within_its_reserved_output_is_relayed_whole(raw_upstream, start_gateway, http,
                                                                     shape: str) -> None:
    parts = WITHIN[shape]
    handler = sse_upstream(*parts, comments=shape.startswith("keep-alive"))
    gateway = await start_gateway(make_settings({"primary": await raw_upstream(handler)}))
    body = {**CHAT, "n": 2, "max_tokens": 5} if shape.startswith("n=2") else CHAT

    reply = await http(gateway, "POST", "/v1/chat/completions", json=body)

    assert reply.body.endswith(b"data: [DONE]\n\n") and b"stream_" not in reply.body
    assert [e for e in events(reply.body) if isinstance(e, dict) and e.get("choices")] == \
        [p for p in parts if p.get("choices")]


async def test_running_usage_chunks_stop_a_stream_of_many_tokens_per_event(raw_upstream, start_gateway,
                                                                            http) -> None:
    parts = [chunk({"content": " three tokens here"}, usage={"prompt_tokens": 9, "completion_tokens": 3 * (i + 1),
                                                              "total_tokens": 9 + 3 * (i + 1)}) for i in range(8)]
    gateway = await start_gateway(make_settings({"primary": await raw_upstream(sse_upstream(*parts))},
                                                policies=(make_policy("g", usd="10"),)))

    reply = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)

    assert output_events(reply.body) == 3                # 9 tokens; the fourth event would make 12 > 10
    assert events(reply.body)[-1]["error"]["code"] == "stream_budget_exhausted"
    assert await spent_usd(http, gateway) == nano_to_usd(cost_nano(PRICES["gpt-4.1"], Usage(9, 9)))
