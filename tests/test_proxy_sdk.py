"""The official openai SDK through the gateway: answers, streams, embeddings, exact usage and cost."""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal

import orjson
import pytest

from gateway.domain.pricing import Usage, cost_nano, format_usd
from tests.support.canary import CANARY_KEY
from tests.support.settings import CLIENT_KEY, PRICES, make_settings

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello to the gateway"}]


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]


def expected_cost_usd(model: str, usage: Usage) -> str:
    return format_usd(cost_nano(PRICES[model], usage))


def last_upstream_usage(upstream, model: str) -> Usage:
    billed = upstream.billed.models[model]
    return Usage(billed.prompt_tokens, billed.completion_tokens, billed.cached_tokens)


@pytest.fixture
async def gateway(upstream, start_gateway):
    return await start_gateway(make_settings({"primary": upstream.url}))


async def test_chat_completion_answer_usage_and_cost(gateway, upstream, sdk, caplog):
    caplog.set_level(logging.INFO, "gateway.access")
    answer = await sdk(gateway).chat.completions.create(model="gpt-4.1", messages=MESSAGES)

    assert answer.choices[0].message.content == upstream.content
    billed = last_upstream_usage(upstream, "gpt-4.1")
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (billed.prompt_tokens,
                                                                             billed.completion_tokens)
    [line] = access_lines(caplog)
    assert line["caller"] == "web-app" and line["provider"] == "primary" and line["status"] == 200
    assert (line["prompt_tokens"], line["completion_tokens"]) == (billed.prompt_tokens, billed.completion_tokens)
    assert line["cost_usd"] == expected_cost_usd("gpt-4.1", billed)
    assert Decimal(line["cost_usd"]) > 0


async def test_cached_tokens_are_billed_at_the_cached_price(gateway, upstream, sdk, caplog):
    caplog.set_level(logging.INFO, "gateway.access")
    await sdk(gateway).chat.completions.create(model="gpt-4.1", messages=MESSAGES, user="cached")

    billed = last_upstream_usage(upstream, "gpt-4.1")
    [line] = access_lines(caplog)
    assert billed.cached_tokens > 0 and line["cached_tokens"] == billed.cached_tokens
    assert line["cost_usd"] == expected_cost_usd("gpt-4.1", billed)
    assert Decimal(line["cost_usd"]) < Decimal(expected_cost_usd("gpt-4.1", Usage(
        billed.prompt_tokens, billed.completion_tokens)))


async def test_stream_with_usage_requested_relays_the_usage_chunk(gateway, upstream, sdk, caplog):
    caplog.set_level(logging.INFO, "gateway.access")
    stream = await sdk(gateway).chat.completions.create(
        model="deepseek-v3.2", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == upstream.content
    usage_chunks = [c for c in chunks if c.usage is not None]
    billed = last_upstream_usage(upstream, "deepseek-v3.2")
    assert len(usage_chunks) == 1 and usage_chunks[0].usage.completion_tokens == billed.completion_tokens
    [line] = access_lines(caplog)
    assert line["cost_usd"] == expected_cost_usd("deepseek-v3.2", billed) and line["usage_estimated"] is False


async def test_stream_without_usage_requested_hides_the_chunk_but_still_records_usage(
        gateway, upstream, sdk, caplog):
    caplog.set_level(logging.INFO, "gateway.access")
    stream = await sdk(gateway).chat.completions.create(model="deepseek-v3.2", messages=MESSAGES, stream=True)
    chunks = [chunk async for chunk in stream]

    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == upstream.content
    assert upstream.requests[-1].json["stream_options"] == {"include_usage": True}
    billed = last_upstream_usage(upstream, "deepseek-v3.2")
    [line] = access_lines(caplog)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (billed.prompt_tokens, billed.completion_tokens)
    assert line["cost_usd"] == expected_cost_usd("deepseek-v3.2", billed) and line["usage_estimated"] is False


async def test_first_streamed_chunk_reaches_the_client_before_the_upstream_finishes(gateway, upstream, sdk):
    upstream.stream_gate = asyncio.Event()
    stream = await sdk(gateway).chat.completions.create(model="gpt-4.1", messages=MESSAGES, stream=True)
    iterator = stream.__aiter__()

    first = await asyncio.wait_for(iterator.__anext__(), timeout=5)
    assert first.choices[0].delta.content and not upstream.stream_gate.is_set()
    assert upstream.billed.models.get("gpt-4.1") is None  # the upstream has not finished its stream
    upstream.stream_gate.set()
    rest = [chunk async for chunk in iterator]
    assert "".join(c.choices[0].delta.content or "" for c in [first, *rest]) == upstream.content


async def test_embeddings(gateway, upstream, sdk, caplog):
    caplog.set_level(logging.INFO, "gateway.access")
    result = await sdk(gateway).embeddings.create(model="text-embedding-3-small", input=["one two", "three"])

    assert len(result.data) == 2 and all(len(item.embedding) > 0 for item in result.data)
    billed = last_upstream_usage(upstream, "text-embedding-3-small")
    [line] = access_lines(caplog)
    assert line["prompt_tokens"] == billed.prompt_tokens > 0
    assert line["cost_usd"] == expected_cost_usd("text-embedding-3-small", billed)


async def test_client_key_is_never_forwarded_and_provider_key_is_added(gateway, upstream, sdk):
    await sdk(gateway).chat.completions.create(model="gpt-4.1", messages=MESSAGES)

    sent = upstream.requests[-1].headers
    assert sent["authorization"] == f"Bearer {CANARY_KEY}"
    assert all(CLIENT_KEY not in value for value in sent.values())


async def test_every_response_names_its_request_and_provider(gateway, http, caplog):
    caplog.set_level(logging.INFO, "gateway.access")
    reply = await http(gateway, "POST", "/v1/chat/completions", json={"model": "gpt-4.1", "messages": MESSAGES})

    assert reply.status == 200 and reply.headers["x-gateway-provider"] == "primary"
    [line] = access_lines(caplog)
    assert reply.headers["x-request-id"] == line["request_id"]
    assert set(line) >= {"request_id", "caller", "model", "provider", "status", "prompt_tokens", "cost_usd",
                         "latency_ms", "attempts"}
    raw = caplog.records[-1].getMessage()
    assert CLIENT_KEY not in raw and "Say hello" not in raw  # never a key, never a prompt


async def test_models_lists_configured_models_in_openai_shape(gateway, sdk):
    models = await sdk(gateway).models.list()
    assert {m.id for m in models.data} == set(PRICES)


async def test_health_and_readiness(gateway, http):
    assert (await http(gateway, "GET", "/healthz", key=None)).status == 200
    ready = await http(gateway, "GET", "/readyz", key=None)
    assert ready.status == 200 and ready.json()["config"] == "loaded"
