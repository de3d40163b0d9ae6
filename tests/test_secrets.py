"""The provider key never leaves the gateway, even when an upstream echoes what it was sent."""

from __future__ import annotations

import logging

from gateway.mock_upstream import Action
from tests.support.canary import CANARY_KEY
from tests.support.settings import make_settings

CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}


async def test_upstream_error_echoing_the_request_is_scrubbed(upstream, start_gateway, http, caplog):
    caplog.set_level(logging.DEBUG)
    gateway = await start_gateway(make_settings({"primary": upstream.url}))
    upstream.script(Action(status=401, echo_request=True))

    reply = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)  # the fixture asserts no canary

    assert reply.status == 401
    assert "[redacted]" in reply.body.decode()          # the echo was there, and it was scrubbed
    assert upstream.requests[-1].headers["authorization"].endswith(CANARY_KEY)
    assert all(CANARY_KEY not in record.getMessage() for record in caplog.records)


async def test_a_failing_stream_that_echoes_its_request_leaks_nothing(upstream, start_gateway, http):
    async def no_sleep(_seconds: float) -> None:
        return None
    gateway = await start_gateway(make_settings({"primary": upstream.url}), sleep=no_sleep)
    upstream.always(Action(status=500, echo_request=True))  # every retry fails: the gateway answers 502
    reply = await http(gateway, "POST", "/v1/chat/completions", json={**CHAT, "stream": True})
    assert reply.status == 502 and upstream.hits == 3    # the `http` fixture asserts the canary is absent
