"""Bad requests get OpenAI-shaped errors and never reach the upstream."""

from __future__ import annotations

import pytest

from tests.support.settings import make_settings

CHAT = "/v1/chat/completions"
GOOD = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def gateway(upstream, start_gateway):
    settings = make_settings({"primary": upstream.url}, max_body_bytes=4096,
                             routes={"gpt-4.1": ["primary"], "gpt-*": ["primary"]})
    return await start_gateway(settings)


def assert_openai_error(reply, status: int, code: str | None = None) -> dict:
    assert reply.status == status, reply.body
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code
    return error


@pytest.mark.parametrize("case, request_kwargs, status, code", [
    ("malformed JSON", {"data": b'{"model": "gpt-4.1", ', "headers": {"Content-Type": "application/json"}},
     400, "invalid_request"),
    ("JSON that is not an object", {"json": ["gpt-4.1"]}, 400, "invalid_request"),
    ("not JSON content type", {"data": b"model=gpt-4.1", "headers": {"Content-Type": "text/plain"}},
     415, "unsupported_media_type"),
    ("body over the limit", {"json": {**GOOD, "pad": "x" * 10_000}}, 413, "request_too_large"),
    ("missing model", {"json": {"messages": GOOD["messages"]}}, 400, "invalid_request"),
    ("unknown model", {"json": {**GOOD, "model": "no-such-model"}}, 404, "model_not_found"),
    ("routed by a glob but unpriced", {"json": {**GOOD, "model": "gpt-unpriced"}}, 404, "model_not_found"),
    ("negative max_tokens", {"json": {**GOOD, "max_tokens": -1}}, 400, "invalid_request"),
])
async def test_bad_request_is_refused_before_the_upstream(gateway, upstream, http, case, request_kwargs,
                                                          status, code):
    reply = await http(gateway, "POST", CHAT, **request_kwargs)
    assert_openai_error(reply, status, code)
    assert upstream.hits == 0, case


async def test_streamed_body_over_the_limit_without_content_length(gateway, upstream, http):
    async def chunks():
        for _ in range(10):
            yield b"x" * 1000
    reply = await http(gateway, "POST", CHAT, data=chunks(), headers={"Content-Type": "application/json"})
    assert_openai_error(reply, 413, "request_too_large")
    assert upstream.hits == 0


@pytest.mark.parametrize("key", [None, "sk-unknown"])
async def test_missing_or_unknown_key_is_401(gateway, upstream, http, key):
    reply = await http(gateway, "POST", CHAT, json=GOOD, key=key)
    assert_openai_error(reply, 401, "invalid_api_key")
    assert upstream.hits == 0


async def test_unknown_path_is_an_openai_shaped_404(gateway, http):
    assert_openai_error(await http(gateway, "POST", "/v1/nope", json=GOOD), 404)


async def test_upstream_errors_pass_through_with_status_and_body(gateway, upstream, http):
    from gateway.mock_upstream import Action
    body = {"error": {"message": "context too long", "type": "invalid_request_error", "param": None,
                      "code": "context_length_exceeded"}}
    upstream.script(Action(status=400, body=body))
    reply = await http(gateway, "POST", CHAT, json=GOOD)
    assert reply.status == 400 and reply.json() == body


async def test_a_client_too_slow_to_send_its_body_gets_408(upstream, start_gateway, http):
    import asyncio
    import dataclasses
    settings = make_settings({"primary": upstream.url})
    settings = dataclasses.replace(settings, server=dataclasses.replace(settings.server, client_timeout_s=0.2))
    gateway = await start_gateway(settings)
    never = asyncio.Event()

    async def stalled_body():
        yield b'{"model": "gpt-4.1", '
        await never.wait()

    reply = await http(gateway, "POST", CHAT, data=stalled_body(), headers={"Content-Type": "application/json"})
    assert_openai_error(reply, 408, "request_timeout")
    assert upstream.hits == 0
