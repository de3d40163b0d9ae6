"""What the upstream receives is what was priced: a body with a key sent twice is forwarded as parsed (the last
value, as priced), so no upstream parser, keeping the first or the last, reads another model or max_tokens."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.mock_upstream import MockUpstream
from tests.support.settings import make_policy, make_settings

MESSAGE = '{"role": "user", "content": "hi there"}'
JSON_HEADERS = {"Content-Type": "application/json"}
BODIES = {
    "model twice": ('{"model": "gpt-4.1", "messages": [' + MESSAGE + '], "model": "gpt-4o-mini"}',
                    "gpt-4o-mini", None),
    "max_tokens twice": ('{"model": "gpt-4o-mini", "max_tokens": 900, "messages": [' + MESSAGE + '], '
                         '"max_tokens": 3}', "gpt-4o-mini", 3),
    "both twice, streamed": ('{"model": "gpt-4.1", "max_tokens": 900, "stream": true, "messages": [' + MESSAGE
                             + '], "model": "gpt-4o-mini", "max_tokens": 2}', "gpt-4o-mini", 2),
    "streamed with usage asked": ('{"model": "gpt-4.1", "max_tokens": 900, "stream": true, "stream_options": '
                                  '{"include_usage": true}, "messages": [' + MESSAGE + '], "max_tokens": 2}',
                                  "gpt-4.1", 2),
}


def strict(raw: bytes) -> dict[str, Any]:
    """The body as a parser that refuses a key sent twice reads it."""
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        assert len(keys) == len(set(keys)), f"the upstream got a key twice: {keys}"
        return dict(pairs)
    return json.loads(raw, object_pairs_hook=no_duplicates)


def first_wins(raw: bytes) -> dict[str, Any]:
    """The body as a parser that keeps the first of repeated keys reads it."""
    return json.loads(raw, object_pairs_hook=lambda pairs: dict(reversed(pairs)))


def received(upstream: MockUpstream) -> dict[str, Any]:
    """The last body the upstream got, read strictly; a first-wins parser reads the same."""
    raw = upstream.requests[-1].raw
    assert strict(raw) == first_wins(raw) == json.loads(raw)
    return strict(raw)


@pytest.fixture
async def gateway(upstream, start_gateway):
    return await start_gateway(make_settings({"primary": upstream.url}))


@pytest.mark.parametrize(("body", "model", "max_tokens"), BODIES.values(), ids=BODIES.keys())
async def test_the_upstream_gets_the_model_and_max_tokens_that_were_priced(
        gateway, upstream, http, body, model, max_tokens):
    reply = await http(gateway, "POST", "/v1/chat/completions", data=body, headers=JSON_HEADERS)
    assert reply.status == 200, reply.body
    got = received(upstream)
    assert got["model"] == model and got.get("max_tokens") == max_tokens


async def test_a_message_with_a_key_twice_is_forwarded_as_priced(gateway, upstream, http):
    long_prompt = " ".join(["word"] * 2000)
    body = ('{"model": "gpt-4.1", "messages": [{"role": "user", "content": "' + long_prompt + '", '
            '"content": "short"}]}')
    reply = await http(gateway, "POST", "/v1/chat/completions", data=body, headers=JSON_HEADERS)
    assert reply.status == 200
    assert received(upstream)["messages"] == [{"role": "user", "content": "short"}]


async def test_a_renamed_model_with_a_key_twice_is_forwarded_as_priced(upstream, start_gateway, http):
    gateway = await start_gateway(make_settings({"primary": upstream.url},
                                                routes={"gpt-4.1": [("primary", "upstream-name")]}))
    body = '{"model": "gpt-4.1", "max_tokens": 900, "messages": [' + MESSAGE + '], "max_tokens": 4}'
    assert (await http(gateway, "POST", "/v1/chat/completions", data=body, headers=JSON_HEADERS)).status == 200
    got = received(upstream)
    assert (got["model"], got["max_tokens"]) == ("upstream-name", 4)


async def test_embeddings_with_an_input_twice_are_forwarded_as_priced(gateway, upstream, http):
    body = '{"model": "text-embedding-3-small", "input": "' + "many words " * 500 + '", "input": "few"}'
    reply = await http(gateway, "POST", "/v1/embeddings", data=body, headers=JSON_HEADERS)
    assert reply.status == 200
    assert received(upstream)["input"] == "few"


async def test_a_body_too_deep_to_forward_is_400_and_costs_nothing(upstream, start_gateway, http):
    gateway = await start_gateway(make_settings({"primary": upstream.url},
                                                policies=(make_policy("cap", requests=1),)))
    deep = "[" * 300 + '"x"' + "]" * 300
    body = '{"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}], "metadata": ' + deep + "}"
    reply = await http(gateway, "POST", "/v1/chat/completions", data=body, headers=JSON_HEADERS)
    assert reply.status == 400 and reply.json()["error"]["code"] == "invalid_request"
    assert upstream.hits == 0
    ok = await http(gateway, "POST", "/v1/chat/completions", json={"model": "gpt-4.1", "messages": [
        {"role": "user", "content": "hi"}]})
    assert ok.status == 200                      # the one request of the budget was not spent on the 400
