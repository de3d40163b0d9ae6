"""Streams and failover: a provider may be changed until the first byte reaches the client, never after.

A stream the upstream cuts off must end in an error the SDK raises, never in a clean end, and its usage
is logged as the gateway's estimate.
"""

from __future__ import annotations

import logging

import openai
import orjson
import pytest

from gateway.config.model import RetryConfig
from gateway.mock_upstream import Action
from tests.support.settings import make_settings

MESSAGES = [{"role": "user", "content": "Say hello to the gateway"}]


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]


@pytest.fixture
async def gateway(upstream, backup_upstream, start_gateway):
    settings = make_settings({"primary": upstream.url, "backup": backup_upstream.url},
                             retry=RetryConfig(max_retries=0))
    return await start_gateway(settings)


async def test_truncated_stream_raises_in_the_sdk_and_logs_estimated_usage(
        gateway, upstream, backup_upstream, sdk, caplog):
    caplog.set_level(logging.INFO, "gateway.access")
    upstream.script(Action(truncate_after=2))
    stream = await sdk(gateway).chat.completions.create(model="gpt-4.1", messages=MESSAGES, stream=True)

    received = []
    with pytest.raises(openai.APIError) as raised:
        async for chunk in stream:
            received.append(chunk)

    assert raised.value.body["code"] == "stream_truncated"
    assert len(received) == 2 and upstream.content.startswith(
        "".join(c.choices[0].delta.content for c in received))
    assert (upstream.hits, backup_upstream.hits) == (1, 0)      # bytes were out: no failover
    [line] = access_lines(caplog)
    assert line["provider"] == "primary" and line["status"] == 200
    assert line["usage_estimated"] is True and line["completion_tokens"] == 2


async def test_stream_fails_over_before_the_first_byte(gateway, upstream, backup_upstream, sdk):
    upstream.script(Action(status=503))

    raw = await sdk(gateway).chat.completions.with_raw_response.create(
        model="gpt-4.1", messages=MESSAGES, stream=True)
    chunks = [chunk async for chunk in raw.parse()]

    assert raw.headers["x-gateway-provider"] == "backup" and raw.headers["x-gateway-attempts"] == "2"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == backup_upstream.content
