"""Repeated hits answered from their bytes (gateway.http.wire_hits) through the real server: the same answer,
ledger row and log line as the repeat path, and aiohttp's way for anything that is not exactly a learned
request on a connection standing between requests."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from typing import Any

import orjson
import pytest
import uvloop

from gateway.cache.memory import HOLD_S
from gateway.clock import FakeClock
from gateway.config.model import CacheConfig, StoreConfig
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.http.appkeys import ACCESS_LOG, BUDGET, CACHE, CONFIG, WIRE_HITS
from gateway.mock_upstream import Action, MockUpstream
from gateway.serving.connections import GatewayRequestHandler
from gateway.serving.listener import bind
from gateway.serving.server import GatewayServer
from tests.support.gateway import ServedGateway, in_tmp
from tests.support.settings import CLIENT_KEY, OTHER_KEY, make_policy, make_settings

CHAT = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "What is a cache?"}],
                     "max_tokens": 50})
STREAM = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "What is a cache?"}],
                       "max_tokens": 50, "stream": True})


def settings_for(upstream, tmp_path, **server: Any):
    settings = make_settings({"primary": upstream.url}, store=StoreConfig(path=str(tmp_path / "budget.db")),
                             cache=CacheConfig(models=("gpt-4o-mini",), ttl_s=60),
                             policies=(make_policy("everyone", usd="100", requests=100_000),))
    return dataclasses.replace(settings, server=dataclasses.replace(settings.server, **server))


def request_bytes(port: int, key: str = CLIENT_KEY, body: bytes = CHAT, *extra: str) -> bytes:
    headers = [f"Host: 127.0.0.1:{port}", f"Authorization: Bearer {key}", "Content-Type: application/json",
               f"Content-Length: {len(body)}", *extra]
    return ("POST /v1/chat/completions HTTP/1.1\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode() + body


class Answer:
    def __init__(self, head: bytes, body: bytes) -> None:
        self.head = head
        lines = head.decode().split("\r\n")
        self.status_line = lines[0]
        self.headers = dict((name.lower(), value) for name, _, value in (line.partition(": ") for line in lines[1:]))
        self.body = body

    def masked(self) -> bytes:
        """The whole answer with the values that differ per request (its id, its date) masked."""
        return re.sub(rb"(?m)^(x-request-id|Date): .*$", rb"\1: *", self.head) + b"\r\n\r\n" + self.body


class Client:
    """One kept-alive connection that writes exact bytes and reads whole answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> Answer:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        answer = Answer(head[:-4], b"")
        if answer.headers.get("transfer-encoding") != "chunked":
            answer.body = await self.reader.readexactly(int(answer.headers["content-length"]))
            return answer
        while size := int((await self.reader.readuntil(b"\r\n"))[:-2], 16):
            answer.body += (await self.reader.readexactly(size + 2))[:-2]
        await self.reader.readexactly(2)
        return answer

    async def ask(self, data: bytes) -> Answer:
        await self.send(data)
        return await self.answer()

    def close(self) -> None:
        self.writer.close()


async def learned(gateway, client: Client, data: bytes) -> list[Answer]:
    """A miss, a hit on the full path, a hit on the repeat path (which learns `data`): their answers."""
    answers = []
    for _ in range(3):
        answers.append(await client.ask(data))
        await gateway.app[CACHE].written()
    assert [a.headers["x-gateway-cache"] for a in answers] == ["miss", "hit", "hit"]
    return answers


async def ledger(gateway) -> list:
    await gateway.app[CACHE].written()
    await gateway.app[BUDGET].settled()
    return await gateway.app[BUDGET].store.ledger(0, 2**40, 10_000)


@pytest.mark.parametrize("body", [CHAT, STREAM], ids=["whole", "stream"])
async def test_a_repeated_hit_is_answered_from_its_bytes_as_the_repeat_path_answers_it(
        upstream, serve_gateway, tmp_path, caplog, body):
    gateway = await serve_gateway(settings_for(upstream, tmp_path))
    wire = gateway.app[WIRE_HITS]
    client = await Client.open(gateway.server.port)
    data = request_bytes(gateway.server.port, CLIENT_KEY, body)
    miss, full_hit, repeat_hit = await learned(gateway, client, data)
    assert wire.answered == 0 and len(wire) == 1

    caplog.set_level(logging.INFO, logger="gateway.access")
    caplog.clear()
    from_bytes = [await client.ask(data) for _ in range(3)]
    repeat_again = await Client.open(gateway.server.port)           # another connection: the repeat path
    on_the_full_way = await repeat_again.ask(data)

    assert wire.answered == 3
    assert all(answer.masked() == repeat_hit.masked() == full_hit.masked() for answer in from_bytes)
    assert all("Date" in answer.head.decode() for answer in from_bytes)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    assert len(lines) == 4 and all(fixed(line) == fixed(lines[-1]) for line in lines)     # the same log lines
    assert [line["request_id"] for line in lines[:3]] == [a.headers["x-request-id"] for a in from_bytes]
    assert on_the_full_way.masked() == from_bytes[0].masked()
    assert len(upstream.requests) == 1
    if body is CHAT:
        assert repeat_hit.body == miss.body
    else:                                           # the miss was relayed chunked: its events, as sent
        assert repeat_hit.headers["content-type"] == "text/event-stream" and repeat_hit.body.endswith(b"[DONE]\n\n")
    ids = [a.headers["x-request-id"] for a in [miss, full_hit, repeat_hit, *from_bytes, on_the_full_way]]
    assert len(set(ids)) == 7
    rows = await ledger(gateway)
    hits = {row.request_id: row for row in rows if row.status == "cache_hit"}
    assert set(hits) == set(ids[1:])
    assert all(fixed(row._asdict()) == fixed(hits[ids[1]]._asdict()) for row in hits.values())  # the same rows
    assert hits[ids[1]].saved_nano > 0 and hits[ids[1]].cost_nano == 0 and hits[ids[1]].caller == "web-app"
    client.close()
    repeat_again.close()


def fixed(fields: dict[str, Any]) -> dict[str, Any]:
    """A log line's or ledger row's fields but those that differ per request."""
    return {name: value for name, value in fields.items() if name not in {"ts", "time", "request_id", "latency_ms"}}


async def test_learned_bytes_answer_only_themselves_on_a_connection_between_requests(
        upstream, serve_gateway, tmp_path):
    gateway = await serve_gateway(settings_for(upstream, tmp_path))
    wire, port = gateway.app[WIRE_HITS], gateway.server.port
    client = await Client.open(port)
    data = request_bytes(port)
    await learned(gateway, client, data)

    other_key = await client.ask(request_bytes(port, OTHER_KEY))           # another caller's token: not learned
    pipelined = await client.send(data + data) or [await client.answer(), await client.answer()]
    await client.send(data[:40])                                            # a read that is part of a request
    await until(lambda: any(c.header_started is not None and not c.silent for c in connections(gateway)))
    await client.send(data[40:])
    split = await client.answer()

    assert wire.answered == 0
    assert other_key.status_line.endswith("200 OK")
    assert [a.headers["x-gateway-cache"] for a in [*pipelined, split]] == ["hit"] * 3
    assert (await client.ask(data)).headers["x-gateway-cache"] == "hit" and wire.answered == 0   # relearned...
    await client.ask(data)
    assert wire.answered == 1                                               # ...then answered from its bytes

    upstream.script(Action(delay_s=0.2))
    other = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Another one?"}]})
    await client.send(request_bytes(port, CLIENT_KEY, other))
    await until(lambda: len(upstream.requests) == 2)                        # that request is in progress
    await client.send(data)                                                 # the learned read, meanwhile
    first, second = await client.answer(), await client.answer()
    assert (first.headers["x-gateway-cache"], second.headers["x-gateway-cache"]) == ("miss", "hit")
    assert b"Another one?" not in second.body and wire.answered == 1       # in order, the full way
    client.close()


async def test_a_read_landing_while_aiohttp_still_finishes_the_learning_request_goes_its_way(
        upstream, serve_gateway, tmp_path, monkeypatch):
    gateway = await serve_gateway(settings_for(upstream, tmp_path))
    wire, port = gateway.app[WIRE_HITS], gateway.server.port
    data = request_bytes(port)
    await learned(gateway, await Client.open(port), data)
    learn = wire.learn

    def learn_then_read(request, *args):
        learn(request, *args)
        request.protocol.data_received(data)        # the next read, before aiohttp waits for one again
    monkeypatch.setattr(wire, "learn", learn_then_read)
    client = await Client.open(port)
    first = await client.ask(data)                  # the repeat path, on a new connection
    monkeypatch.undo()
    second = await client.answer()

    assert [first.headers["x-gateway-cache"], second.headers["x-gateway-cache"]] == ["hit", "hit"]
    assert wire.answered == 0
    await client.ask(data)                          # learned again (the read kept was let go of meanwhile)
    assert (await client.ask(data)).headers["x-gateway-cache"] == "hit" and wire.answered == 1
    client.close()


async def test_a_new_config_or_an_entry_no_longer_held_in_memory_goes_the_full_path(
        upstream, serve_gateway, tmp_path):
    clock = FakeClock()
    gateway = await serve_gateway(settings_for(upstream, tmp_path), clock=clock)
    wire, port = gateway.app[WIRE_HITS], gateway.server.port
    client = await Client.open(port)
    data = request_bytes(port)
    await learned(gateway, client, data)

    clock.advance(HOLD_S + 1)                       # memory lets go; the store still holds it (ttl 60 s)
    assert (await client.ask(data)).headers["x-gateway-cache"] == "hit" and wire.answered == 0
    assert (await client.ask(data)).headers["x-gateway-cache"] == "hit" and wire.answered == 0  # learned again
    holder = gateway.app[CONFIG]
    holder.swap(dataclasses.replace(holder.current))
    assert (await client.ask(data)).headers["x-gateway-cache"] == "hit" and wire.answered == 0
    assert len(wire) == 0                           # the new config forgot every learned request
    assert [(await client.ask(data)).headers["x-gateway-cache"] for _ in range(2)] == ["hit", "hit"]
    assert wire.answered == 1                       # learned under the new config, then answered from bytes
    clock.advance(60)                               # past the time to live: a miss, never a stale answer
    assert (await client.ask(data)).headers["x-gateway-cache"] == "miss" and len(upstream.requests) == 2
    assert wire.answered == 1
    client.close()


async def test_a_request_asking_to_close_is_never_learned(upstream, serve_gateway, tmp_path):
    gateway = await serve_gateway(settings_for(upstream, tmp_path))
    wire, port = gateway.app[WIRE_HITS], gateway.server.port
    data = request_bytes(port, CLIENT_KEY, CHAT, "Connection: close")
    for expected in ["miss", "hit", "hit", "hit"]:
        client = await Client.open(port)
        assert (await client.ask(data)).headers["x-gateway-cache"] == expected
        assert await asyncio.wait_for(client.reader.read(), 5) == b""      # closed after its answer, as asked
        await gateway.app[CACHE].written()
    assert len(wire) == 0 and wire.answered == 0


async def test_answers_from_bytes_keep_the_connection_alive_past_its_idle_timeout(upstream, serve_gateway, tmp_path):
    gateway = await serve_gateway(settings_for(upstream, tmp_path, keepalive_timeout_s=1.0))
    wire, port = gateway.app[WIRE_HITS], gateway.server.port
    client = await Client.open(port)
    data = request_bytes(port)
    await learned(gateway, client, data)
    for _ in range(8):                              # 1.6 s of requests 0.2 s apart: never idle for 1 s
        await asyncio.sleep(0.2)
        assert (await client.ask(data)).headers["x-gateway-cache"] == "hit"
    assert wire.answered == 8
    assert await asyncio.wait_for(client.reader.read(), 5) == b""          # then idle: closed as any idle one


async def test_a_connection_with_answers_still_unsent_is_answered_the_full_way(upstream, serve_gateway, tmp_path):
    gateway = await serve_gateway(settings_for(upstream, tmp_path))
    wire, port = gateway.app[WIRE_HITS], gateway.server.port
    client = await Client.open(port)
    data = request_bytes(port)
    await learned(gateway, client, data)
    (connection,) = connections(gateway)
    assert connection.at_boundary
    transport = connection.transport
    connection.transport = Backlogged(transport)  # type: ignore[assignment]

    answer = await client.ask(data)

    assert answer.headers["x-gateway-cache"] == "hit" and wire.answered == 0
    connection.transport = transport                                      # the client read its answers
    assert (await client.ask(data)).headers["x-gateway-cache"] == "hit" and wire.answered == 1
    client.close()


async def test_a_failure_after_an_answer_from_bytes_is_logged_and_the_connection_goes_on(
        upstream, serve_gateway, tmp_path, caplog, monkeypatch):
    gateway = await serve_gateway(settings_for(upstream, tmp_path))
    wire, port = gateway.app[WIRE_HITS], gateway.server.port
    client = await Client.open(port)
    data = request_bytes(port)
    await learned(gateway, client, data)
    access_log = gateway.app[ACCESS_LOG]
    monkeypatch.setattr(access_log, "write", broken_write)

    answer = await client.ask(data)

    assert answer.headers["x-gateway-cache"] == "hit" and wire.answered == 1
    assert any("answered from its bytes failed" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    assert (await client.ask(data)).headers["x-gateway-cache"] == "hit" and wire.answered == 2
    client.close()


def broken_write(record: Any) -> None:
    raise BrokenPipeError("stderr is gone")


def test_under_uvloop_the_production_loop_repeated_hits_are_answered_from_their_bytes(tmp_path):
    async def scenario() -> tuple[int, int]:
        mock = MockUpstream(name="primary")
        upstream_server = TestServer(mock.app(), host="127.0.0.1")
        await upstream_server.start_server()
        mock.url = str(upstream_server.make_url("/v1"))  # type: ignore[attr-defined]
        settings = in_tmp(settings_for(mock, tmp_path), tmp_path)
        gateway = ServedGateway(create_app(settings), None)  # type: ignore[arg-type]
        gateway.server = GatewayServer(gateway.app, bind("127.0.0.1", 0), settings.server, 64)
        await gateway.server.start()
        try:
            client = await Client.open(gateway.server.port)
            data = request_bytes(gateway.server.port)
            await learned(gateway, client, data)
            answers = [await client.ask(data) for _ in range(3)]
            client.close()
            return gateway.app[WIRE_HITS].answered, sum(a.headers["x-gateway-cache"] == "hit" for a in answers)
        finally:
            await gateway.server.stop(0)
            await upstream_server.close()

    assert uvloop.run(scenario()) == (3, 3)


class Backlogged:
    """A transport that says it has bytes it could not send yet (a client not reading its answers)."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def get_write_buffer_size(self) -> int:
        return 64 * 1024

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def connections(gateway) -> list[GatewayRequestHandler]:
    return list(gateway.server.connections._open)


async def until(condition, within_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)
