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


async def test_streamed_echo_is_scrubbed_too(upstream, start_gateway, http):
    gateway = await start_gateway(make_settings({"primary": upstream.url}))
    upstream.script(Action(status=500, echo_request=True))
    reply = await http(gateway, "POST", "/v1/chat/completions", json={**CHAT, "stream": True})
    assert reply.status == 500 and "[redacted]" in reply.body.decode()
