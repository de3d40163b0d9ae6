"""Slow and abusive clients, in the test's loop: the header deadline, the connection cap, malformed heads."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import aiohttp

from gateway.config.model import ServerConfig
from gateway.mock_upstream import Action
from tests.support.settings import CLIENT_KEY, make_settings

CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
PARTIAL_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nX-Trickle: 1\r\n"


def settings_for(upstream, **server):
    settings = make_settings({"primary": upstream.url})
    return dataclasses.replace(settings, server=dataclasses.replace(settings.server, **server))


async def open_partial(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that sent the start of a request head and nothing more (yet)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(PARTIAL_HEAD)
    await writer.drain()
    return reader, writer


async def closed_by_server(reader: asyncio.StreamReader, within_s: float = 5.0) -> bool:
    """True when the server closes the connection (EOF or reset) within `within_s`."""
    try:
        return await asyncio.wait_for(reader.read(), within_s) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def until(condition, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_head_not_complete_by_the_deadline_is_closed_and_a_served_or_idle_one_is_not(
        upstream, serve_gateway, http):
    gateway = await serve_gateway(settings_for(upstream, header_timeout_s=10))
    connections = gateway.server.connections
    trickler, _ = await open_partial(gateway.url)
    async with aiohttp.ClientSession() as idle:            # served once, then idle in its keep-alive pool
        async with idle.get(gateway.url + "/healthz") as reply:
            assert reply.status == 200
        upstream.script(Action(delay_s=1.0))
        slow = asyncio.create_task(http(gateway, "POST", "/v1/chat/completions", json=CHAT))
        await until(lambda: upstream.hits == 1 and len(connections) == 3)
        loop = asyncio.get_running_loop()

        assert connections.close_overdue(loop.time() + 9) == 0
        assert connections.close_overdue(loop.time() + 10.5) == 1

        assert await closed_by_server(trickler)
        assert (await slow).status == 200                  # its head was complete: served in full
        assert len(connections) == 2                       # the idle keep-alive connection and the slow one


async def test_a_trickling_client_is_closed_by_the_sweep_within_the_deadline(upstream, serve_gateway):
    gateway = await serve_gateway(settings_for(upstream, header_timeout_s=0.4))
    started = time.monotonic()
    reader, writer = await open_partial(gateway.url)

    async def trickle() -> None:
        for _ in range(20):                                # one header line every 0.1 s, never the blank line
            writer.write(b"X-More: 1\r\n")
            await asyncio.sleep(0.1)

    trickling = asyncio.create_task(trickle())
    closed = await closed_by_server(reader, within_s=2)
    took = time.monotonic() - started
    trickling.cancel()
    assert closed and 0.4 <= took < 0.4 + 0.1 + 0.5        # the deadline, one sweep, slack


async def test_at_the_cap_a_new_client_is_served_by_closing_the_longest_waiting_head(upstream, serve_gateway, http):
    gateway = await serve_gateway(settings_for(upstream, header_timeout_s=60), max_connections=20)
    tricklers = [await open_partial(gateway.url) for _ in range(20)]
    await until(lambda: len(gateway.server.connections) == 20)

    started = time.monotonic()
    reply = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)

    assert reply.status == 200 and time.monotonic() - started < 1.0
    assert await closed_by_server(tricklers[0][0], within_s=1)      # the oldest made room
    assert len(gateway.server.connections) <= 20


async def test_at_the_cap_a_stalled_head_goes_before_a_client_yet_to_write_or_an_idle_kept_alive_one(
        upstream, serve_gateway, http):
    gateway = await serve_gateway(settings_for(upstream, header_timeout_s=60), max_connections=3)
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    silent = await asyncio.open_connection(host, int(port))             # oldest: connected, nothing sent yet
    idle = await asyncio.open_connection(host, int(port))               # served once, then kept alive
    idle[1].write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
    head = await idle[0].readuntil(b"\r\n\r\n")
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")).split(b":")[1])
    await idle[0].readexactly(length)
    stalled = await open_partial(gateway.url)
    await until(lambda: len(gateway.server.connections) == 3)

    reply = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)

    assert reply.status == 200
    assert await closed_by_server(stalled[0], within_s=1)                # it made room, once 0.25 s old
    assert not await closed_by_server(silent[0], within_s=0.1)           # a client may be slow to write
    assert not await closed_by_server(idle[0], within_s=0.1)             # nor dropped between two requests


async def test_at_the_cap_with_every_connection_serving_a_new_one_waits_for_a_free_slot(
        upstream, serve_gateway, http):
    gateway = await serve_gateway(settings_for(upstream), max_connections=2)
    upstream.always(Action(delay_s=0.5))
    busy = [asyncio.create_task(http(gateway, "POST", "/v1/chat/completions", json=CHAT)) for _ in range(2)]
    await until(lambda: upstream.hits == 2)
    upstream.always(None)

    waiting = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)

    assert waiting.status == 200 and upstream.hits == 3
    assert [(await b).status for b in busy] == [200, 200]   # nobody serving a request was closed for it


async def test_a_malformed_head_gets_an_openai_shaped_400_without_its_raw_bytes(upstream, serve_gateway):
    gateway = await serve_gateway(settings_for(upstream))
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(PARTIAL_HEAD + f"Authorization: Bearer {CLIENT_KEY}\x00\r\n\r\n".encode())

    answer = await asyncio.wait_for(reader.read(), 5)

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 400 " in head.split(b"\r\n")[0]
    assert body.startswith(b'{"error":') and b'"code":"invalid_request"' in body
    assert CLIENT_KEY.encode() not in answer and b"Malformed HTTP request" in body


def test_server_defaults_are_the_documented_ones():
    server = ServerConfig()
    assert (server.header_timeout_s, server.keepalive_timeout_s, server.max_connections,
            server.shutdown_grace_s) == (10.0, 75.0, 4096, 30.0)
