"""Upstream answers are bounded: past `max_response_bytes` a non-streamed answer is a 502 and its connection
is dropped, memory stays flat, a body cut short is a 502 (never a 500), error bodies read before a retry are
bounded too, and an unreadable 2xx answer is still charged (the worst case: the provider generated it)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config.model import RetryConfig
from gateway.domain.pricing import Usage, cost_nano, nano_to_usd
from gateway.domain.tokens import prompt_upper_bound
from gateway.mock_upstream import Action, MockUpstream
from tests.support.redis_server import free_port
from tests.support.replicas import wait_healthy
from tests.support.settings import ADMIN_KEY, PRICES, make_policy, make_settings

REPO = Path(__file__).resolve().parent.parent
LIMIT = 64 * 1024
CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "bound me"}], "max_tokens": 7}
WORST_CASE = nano_to_usd(cost_nano(PRICES["gpt-4.1"], Usage(prompt_upper_bound(CHAT), CHAT["max_tokens"])))
MIB = 1 << 20


async def no_sleep(_seconds: float) -> None:
    """The gateway's retry sleep, without the wait."""


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Let the event loop run until `predicate` holds (socket events need real loop turns)."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def settled(http, gateway) -> Decimal:
    """USD spent on the global policy once nothing is reserved any more."""
    for _ in range(200):
        [entry] = [e for e in (await http(gateway, "GET", "/v1/budget/status", key=ADMIN_KEY)).json()["data"]
                   if e["unit"] == "usd"]
        if Decimal(entry["reserved"]) == 0:
            return Decimal(entry["spent"])
        await asyncio.sleep(0.02)
    pytest.fail(f"the reservation was never settled: {entry}")


def with_limit(*mocks: MockUpstream, limit: int = LIMIT, **overrides: Any):
    """The mocks as providers answering at most `limit` bytes, under a USD policy; no retries unless asked."""
    settings = make_settings({mock.name: mock.url for mock in mocks}, policies=(make_policy("global", usd="10"),),
                             **{"retry": RetryConfig(max_retries=0), **overrides})
    providers = {name: dataclasses.replace(p, max_response_bytes=limit) for name, p in settings.providers.items()}
    return dataclasses.replace(settings, providers=providers)


def assert_openai_error(reply, status: int, code: str) -> None:
    assert reply.status == status, reply.body
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code and error["message"]


# -- the limit ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_an_answer_at_the_limit_passes_and_one_byte_more_is_a_502(
        upstream, start_gateway, http, chunked):
    gateway = await start_gateway(with_limit(upstream))
    upstream.script(Action(pad_to=LIMIT, chunked=chunked), Action(pad_to=LIMIT + 1, chunked=chunked))

    at_limit = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)
    over = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)

    assert at_limit.status == 200 and len(at_limit.body) == LIMIT
    assert at_limit.json()["choices"][0]["message"]["content"] == " ".join(upstream.content.split()[:7])
    assert_openai_error(over, 502, "upstream_response_too_large")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_an_oversized_answer_drops_its_connection_and_is_charged_the_worst_case(
        upstream, start_gateway, http, chunked):
    gateway = await start_gateway(with_limit(upstream))
    upstream.script(Action(pad_to=64 * MIB, chunked=chunked))

    reply = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)

    assert_openai_error(reply, 502, "upstream_response_too_large")
    await wait_until(lambda: upstream.dropped == 1)      # the gateway hung up instead of reading on
    assert upstream.billed.requests == 0
    assert await settled(http, gateway) == WORST_CASE    # generated, so billed by the provider: never $0
    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200


async def test_an_oversized_error_answer_is_a_502_and_costs_nothing(upstream, start_gateway, http):
    gateway = await start_gateway(with_limit(upstream))
    upstream.script(Action(status=400, pad_to=4 * MIB))
    reply = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)
    assert_openai_error(reply, 502, "upstream_response_too_large")
    assert await settled(http, gateway) == 0


# -- a body cut short ---------------------------------------------------------------------------------------

async def test_a_truncated_answer_is_a_502_not_a_500_and_is_charged_the_worst_case(
        upstream, start_gateway, http, caplog):
    caplog.set_level(logging.ERROR)
    gateway = await start_gateway(with_limit(upstream))
    upstream.script(Action(truncate_after=40))          # Content-Length says more than arrives

    reply = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)

    assert_openai_error(reply, 502, "upstream_truncated")
    assert not [r for r in caplog.records if r.exc_info]            # no traceback logged
    assert await settled(http, gateway) == WORST_CASE


async def test_an_answer_that_stalls_mid_body_is_a_504_and_is_charged_the_worst_case(start_gateway, http):
    release = asyncio.Event()

    async def stalling(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b'{"id": "stalled", ')
        await release.wait()                                # until the test ends
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stalling)
    async with TestServer(app, host="127.0.0.1") as server:
        settings = make_settings({"primary": str(server.make_url("/v1"))}, read_timeout_s=0.3,
                                 policies=(make_policy("global", usd="10"),))
        gateway = await start_gateway(settings)
        reply = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)
        release.set()
    assert_openai_error(reply, 504, "upstream_timeout")
    assert await settled(http, gateway) == WORST_CASE


# -- error bodies read before a retry ---------------------------------------------------------------------

async def test_error_bodies_read_before_a_retry_are_bounded(upstream, backup_upstream, start_gateway, http):
    settings = with_limit(upstream, backup_upstream, limit=32 * MIB, retry=RetryConfig(max_retries=1))
    gateway = await start_gateway(settings, sleep=no_sleep)
    upstream.script(Action(status=503, pad_to=16 * MIB), Action(status=429, pad_to=16 * MIB, chunked=True))

    reply = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)

    assert reply.status == 200 and reply.headers["x-gateway-provider"] == "backup"
    assert (upstream.hits, backup_upstream.hits) == (2, 1)
    await wait_until(lambda: upstream.dropped == 2)      # both dropped after 64 KiB, not read to their end


async def test_a_429_whose_body_is_too_large_is_passed_on_with_the_gateways_own_body(
        upstream, start_gateway, http):
    gateway = await start_gateway(with_limit(upstream), sleep=no_sleep)
    upstream.script(Action(status=429, pad_to=4 * MIB, headers={"Retry-After": "3"}))
    reply = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)
    assert_openai_error(reply, 429, "rate_limit_exceeded")
    assert reply.json()["error"]["message"] == "Provider 'primary' answered 429."   # not the unread body's
    assert reply.headers["Retry-After"] == "3"
    assert await settled(http, gateway) == 0


# -- memory, measured on a gateway process of its own ----------------------------------------------------

CONFIG = """\
server: {{host: 127.0.0.1, port: {port}, auth: none, access_log: false}}
store: {{path: {tmp}/gateway.db, journal_path: {tmp}/journal.jsonl}}
providers:
  mock: {{base_url: "{upstream}", api_key: sk-bounds-provider-0001, timeouts: {{connect_s: 2, read_s: 20, total_s: 60}}}}
routes:
  gpt-4o-mini: [mock]
pricing:
  gpt-4o-mini: {{input: 0.15, output: 0.60, max_output_tokens: 1000}}
policies: []
"""


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {line.split(":")[0]: int(line.split()[1]) for line in lines if line.startswith(("VmRSS", "VmHWM"))}


@pytest.fixture
async def gateway_process(upstream, tmp_path: Path) -> AsyncIterator[tuple[int, str]]:
    """`python -m gateway run` on the mock upstream; yields its pid and URL."""
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG.format(port=port, tmp=tmp_path, upstream=upstream.url))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with open(tmp_path / "gateway.log", "wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "run", "--config", str(config), stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            await wait_healthy(session, url, process)
        yield process.pid, url
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=10)
            except TimeoutError:
                process.kill()
                await process.wait()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_200_mib_answer_is_a_502_and_the_gateway_stays_flat(upstream, gateway_process, chunked):
    pid, url = gateway_process
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a huge answer please"}]}
    async with aiohttp.ClientSession() as session:
        for _ in range(3):                                   # warm up: imports, pools, first allocations
            async with session.post(url + "/v1/chat/completions", json=body) as warm:
                assert warm.status == 200
        before = memory_kib(pid)
        upstream.script(Action(pad_to=200 * MIB, chunked=chunked))
        async with session.post(url + "/v1/chat/completions", json=body) as reply:
            assert reply.status == 502
            assert (await reply.json())["error"]["code"] == "upstream_response_too_large"
        after = memory_kib(pid)

    await wait_until(lambda: upstream.dropped == 1)
    assert (after["VmHWM"] - before["VmHWM"]) * 1024 < 50 * MIB, (before, after)
