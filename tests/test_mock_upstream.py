"""The bundled mock upstream: normal answers, scripted failures, billing, control endpoints, the openai SDK."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from openai import AsyncOpenAI

from gateway.mock_upstream import MOCK_UPSTREAM, Action, MockUpstream

CHAT = "/v1/chat/completions"
CONTENT = "Hello from the mock upstream!"


def chat_body(text: str = "one two three", **extra: Any) -> dict[str, Any]:
    """A one-message chat request."""
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


async def read_events(resp: aiohttp.ClientResponse) -> list[str]:
    """The data payloads of a server-sent event stream."""
    return [line[6:].strip() async for line in _lines(resp) if line.startswith("data: ")]


async def _lines(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    async for raw in resp.content:
        yield raw.decode()


@pytest.fixture
def mock() -> MockUpstream:
    return MockUpstream()


@pytest.fixture
async def server(mock: MockUpstream) -> AsyncIterator[TestServer]:
    async with TestServer(mock.app(), host="127.0.0.1") as srv:
        yield srv


@pytest.fixture
async def client(server: TestServer) -> AsyncIterator[TestClient]:
    async with TestClient(server) as cli:
        yield cli


async def test_chat_answer_is_openai_shaped_with_deterministic_usage(
    mock: MockUpstream, client: TestClient,
) -> None:
    resp = await client.post(CHAT, json=chat_body(), headers={"Authorization": "Bearer sk-up"})
    assert resp.status == 200
    assert resp.headers["x-mock-upstream"] == "mock"
    data = await resp.json()
    assert data["object"] == "chat.completion" and data["model"] == "gpt-4o-mini"
    assert data["choices"][0]["message"] == {"role": "assistant", "content": CONTENT, "refusal": None}
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"] == {"prompt_tokens": 3 + 3, "completion_tokens": 5, "total_tokens": 11,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert mock.hits == 1 and mock.requests[0].path == CHAT
    assert mock.requests[0].headers["authorization"] == "Bearer sk-up"
    assert mock.requests[0].json == chat_body()


async def test_max_tokens_cuts_the_answer_and_reports_length(client: TestClient) -> None:
    data = await (await client.post(CHAT, json=chat_body(max_completion_tokens=2))).json()
    assert data["choices"][0]["message"]["content"] == "Hello from"
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 2


async def test_prompt_tokens_count_words_plus_three_per_message(mock: MockUpstream) -> None:
    body = {"model": "m", "messages": [
        {"role": "system", "content": "be  brief"},
        {"role": "user", "content": [{"type": "text", "text": "a b c"}, {"type": "image_url", "image_url": {}}]},
    ], "user": "cached"}
    usage = mock.usage_for(body)
    assert usage["prompt_tokens"] == (2 + 3) + (3 + 3)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 5


async def test_stream_without_include_usage_has_no_usage_chunk(mock: MockUpstream, client: TestClient) -> None:
    resp = await client.post(CHAT, json=chat_body(stream=True))
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = await read_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)
    assert len(chunks) == 5 + 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == CONTENT
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert mock.billed.requests == 0


async def test_stream_with_include_usage_ends_with_a_usage_chunk(mock: MockUpstream, client: TestClient) -> None:
    resp = await client.post(CHAT, json=chat_body(stream=True, stream_options={"include_usage": True}))
    events = await read_events(resp)
    assert events[-1] == "[DONE]"
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == 6 and usage_chunk["usage"]["completion_tokens"] == 5
    assert all(json.loads(e)["usage"] is None for e in events[:-2])
    assert mock.billed.requests == 1 and mock.billed.completion_tokens == 5


async def test_scripted_429_with_retry_after_then_200(mock: MockUpstream, client: TestClient) -> None:
    mock.script(Action(status=429, headers={"Retry-After": "1"}))
    first = await client.post(CHAT, json=chat_body())
    assert first.status == 429 and first.headers["Retry-After"] == "1"
    assert (await first.json())["error"]["type"] == "rate_limit_error"
    second = await client.post(CHAT, json=chat_body())
    assert second.status == 200
    assert mock.billed.requests == 1 and mock.hits == 2


async def test_path_script_only_applies_to_its_path(mock: MockUpstream, client: TestClient) -> None:
    mock.script(Action(status=503), path="/v1/embeddings")
    assert (await client.post(CHAT, json=chat_body())).status == 200
    assert (await client.post("/v1/embeddings", json={"model": "e", "input": "x"})).status == 503
    assert (await client.post("/v1/embeddings", json={"model": "e", "input": "x"})).status == 200


async def test_always_is_sticky_until_cleared(mock: MockUpstream, client: TestClient) -> None:
    mock.always(Action(status=500, body={"error": {"message": "boom", "type": "server_error"}}))
    for _ in range(2):
        resp = await client.post(CHAT, json=chat_body())
        assert resp.status == 500 and (await resp.json())["error"]["message"] == "boom"
    mock.always(None)
    assert (await client.post(CHAT, json=chat_body())).status == 200
    assert mock.billed.requests == 1


async def test_hang_makes_the_client_time_out(mock: MockUpstream, client: TestClient) -> None:
    mock.script(Action(hang=True))
    with pytest.raises(asyncio.TimeoutError):
        await client.post(CHAT, json=chat_body(), timeout=aiohttp.ClientTimeout(total=0.2))
    assert mock.hits == 1 and mock.billed.requests == 0


async def test_a_hung_request_does_not_hold_up_shutdown() -> None:
    mock = MockUpstream()
    mock.script(Action(hang=True))
    server = TestServer(mock.app(), host="127.0.0.1")
    async with TestClient(server) as cli:
        pending = asyncio.create_task(cli.post(CHAT, json=chat_body()))
        while mock.hits == 0:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await server.close()
        assert time.monotonic() - started < 2
        with pytest.raises(aiohttp.ClientConnectionError):
            await pending


async def test_reset_drops_the_connection(mock: MockUpstream, client: TestClient) -> None:
    mock.script(Action(reset=True))
    with pytest.raises(aiohttp.ClientConnectionError):
        await client.post(CHAT, json=chat_body())
    assert (await client.post(CHAT, json=chat_body())).status == 200


async def test_truncate_after_ends_the_stream_without_done(mock: MockUpstream, client: TestClient) -> None:
    mock.script(Action(truncate_after=2))
    resp = await client.post(CHAT, json=chat_body(stream=True, stream_options={"include_usage": True}))
    events: list[str] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async for line in _lines(resp):
            if line.startswith("data: "):
                events.append(line[6:].strip())
    assert len(events) == 2 and "[DONE]" not in events
    assert mock.billed.requests == 0


async def test_truncate_after_on_a_plain_answer_cuts_the_body(mock: MockUpstream, client: TestClient) -> None:
    mock.script(Action(truncate_after=10))
    resp = await client.post(CHAT, json=chat_body())
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    assert mock.billed.requests == 0


@pytest.mark.parametrize("chunked", [False, True])
async def test_pad_to_pads_a_valid_answer_to_the_byte(mock: MockUpstream, client: TestClient, chunked: bool) -> None:
    mock.script(Action(pad_to=200_000, chunked=chunked), Action(status=503, pad_to=70_000))
    resp = await client.post(CHAT, json=chat_body())
    body = await resp.read()
    assert len(body) == 200_000 and json.loads(body)["choices"][0]["message"]["content"] == CONTENT
    assert (resp.content_length is None) == chunked and mock.billed.requests == 1
    error = await client.post(CHAT, json=chat_body())
    assert error.status == 503 and len(await error.read()) == 70_000 and mock.billed.requests == 1


async def test_a_padded_answer_the_client_leaves_is_counted_as_dropped(mock: MockUpstream, client: TestClient) -> None:
    mock.script(Action(pad_to=64 << 20))
    resp = await client.post(CHAT, json=chat_body())
    await resp.content.readexactly(1 << 20)
    resp.close()
    async with asyncio.timeout(5):
        while mock.dropped == 0:
            await asyncio.sleep(0.01)
    assert mock.billed.requests == 0


async def test_raw_body_is_sent_as_is_and_raw_request_bytes_are_kept(mock: MockUpstream, client: TestClient) -> None:
    sent = b'{"model": "gpt-4o-mini", "model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
    mock.script(Action(status=400, raw_body='{"error": "\\u0073k-\\/"}'))
    resp = await client.post(CHAT, data=sent, headers={"Content-Type": "application/json"})
    assert resp.status == 400 and await resp.read() == b'{"error": "\\u0073k-\\/"}'
    assert resp.headers["Content-Type"] == "application/json"
    assert mock.requests[0].raw == sent and mock.requests[0].json["model"] == "gpt-4o"


async def test_stream_gate_holds_the_rest_until_set(mock: MockUpstream, client: TestClient) -> None:
    gate = mock.stream_gate = asyncio.Event()
    resp = await client.post(CHAT, json=chat_body(stream=True, stream_options={"include_usage": True}))
    first = await resp.content.readline()
    assert json.loads(first[6:])["choices"][0]["delta"]["content"] == "Hello"
    await asyncio.sleep(0.05)
    assert mock.billed.requests == 0 and not resp.content.is_eof()
    gate.set()
    rest = await read_events(resp)
    assert rest[-1] == "[DONE]" and mock.billed.requests == 1


async def test_billed_totals_per_model_skip_errors(mock: MockUpstream, client: TestClient) -> None:
    await client.post(CHAT, json=chat_body("a b c d", user="cached"))
    await client.post(CHAT, json={**chat_body(max_tokens=1), "model": "gpt-4o"})
    await client.post("/v1/completions", json={"model": "gpt-4o", "prompt": "x y"})
    await client.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": ["a b", "c"]})
    mock.script(Action(status=429), Action(status=503))
    await client.post(CHAT, json=chat_body())
    await client.post(CHAT, json=chat_body())
    mini, big = mock.billed.models["gpt-4o-mini"], mock.billed.models["gpt-4o"]
    assert (mini.prompt_tokens, mini.completion_tokens, mini.cached_tokens, mini.requests) == (7, 5, 3, 1)
    assert (big.prompt_tokens, big.completion_tokens, big.cached_tokens, big.requests) == (6 + 2, 1 + 5, 0, 2)
    assert mock.billed.models["text-embedding-3-small"].prompt_tokens == 3
    assert mock.billed.requests == 4 and mock.hits == 6


async def test_echo_request_sends_back_what_it_received(mock: MockUpstream, client: TestClient) -> None:
    mock.script(Action(status=400, echo_request=True))
    resp = await client.post(CHAT, json=chat_body(), headers={"Authorization": "Bearer sk-secret"})
    assert resp.status == 400
    echo = (await resp.json())["error"]["request"]
    assert echo["headers"]["Authorization"] == "Bearer sk-secret" and echo["body"] == chat_body()
    assert client.server.app[MOCK_UPSTREAM] is mock


async def test_completions_legacy_answer_and_stream(client: TestClient) -> None:
    data = await (await client.post("/v1/completions", json={"model": "m", "prompt": "say hi"})).json()
    assert data["object"] == "text_completion" and data["choices"][0]["text"] == CONTENT
    assert data["usage"]["prompt_tokens"] == 2
    resp = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "stream": True,
                                                      "stream_options": {"include_usage": True}})
    events = await read_events(resp)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 5
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2]) == CONTENT


async def test_embeddings_are_deterministic_8_dim_vectors(client: TestClient) -> None:
    body = {"model": "text-embedding-3-small", "input": ["a b", "c"]}
    first = await (await client.post("/v1/embeddings", json=body)).json()
    second = await (await client.post("/v1/embeddings", json=body)).json()
    assert [len(d["embedding"]) for d in first["data"]] == [8, 8]
    assert first["data"] == second["data"]
    assert first["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


async def test_models_and_bad_requests(client: TestClient) -> None:
    models = await (await client.get("/v1/models")).json()
    assert "gpt-4o-mini" in {m["id"] for m in models["data"]}
    bad = await client.post(CHAT, data=b"{not json", headers={"Content-Type": "application/json"})
    assert bad.status == 400 and (await bad.json())["error"]["type"] == "invalid_request_error"


async def test_control_endpoints_script_stats_and_reset(mock: MockUpstream, client: TestClient) -> None:
    action = {"status": 429, "headers": {"Retry-After": "2"}}
    scripted = await client.post("/__script", json={"path": CHAT, "actions": [action]})
    assert (await scripted.json())["pending"] == 1
    assert (await client.post("/__script", json=[{"bogus": 1}])).status == 400
    limited = await client.post(CHAT, json=chat_body())
    assert limited.status == 429 and limited.headers["Retry-After"] == "2"
    await client.post(CHAT, json=chat_body())
    await client.post("/__always", json={"status": 503})
    assert (await client.post(CHAT, json=chat_body())).status == 503
    stats = await (await client.get("/__stats")).json()
    assert stats["hits"] == 3 and stats["billed"]["requests"] == 1
    assert stats["billed"]["models"]["gpt-4o-mini"]["prompt_tokens"] == 6
    await client.post("/__reset")
    assert mock.hits == 0 and mock.requests == [] and mock.billed.requests == 0
    assert (await client.post(CHAT, json=chat_body())).status == 200


async def test_openai_sdk_chat_stream_and_embeddings(mock: MockUpstream, server: TestServer) -> None:
    sdk = AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="sk-test", max_retries=0)
    try:
        messages = [{"role": "user", "content": "hi"}]
        answer = await sdk.chat.completions.create(model="gpt-4o-mini", messages=messages)
        assert answer.choices[0].message.content == CONTENT and answer.usage.total_tokens == 4 + 5
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=messages, stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == CONTENT
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
        floats = await sdk.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        packed = await sdk.embeddings.create(model="text-embedding-3-small", input=["a", "b"],
                                             encoding_format="base64")
        assert [len(d.embedding) for d in floats.data] == [8, 8]
        assert floats.data[0].embedding == pytest.approx(_decode(packed.data[0].embedding))
    finally:
        await sdk.close()
    assert mock.requests[0].headers["authorization"] == "Bearer sk-test"
    assert mock.billed.requests == 4


def _decode(value: Any) -> list[float]:
    """Floats from an SDK embedding that may still be base64."""
    if isinstance(value, list):
        return value
    raw = base64.b64decode(value)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_run_mock_serves_and_prints_its_address() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = f"from gateway.mock_upstream import run_mock; run_mock('127.0.0.1', {port})"
    root = Path(__file__).resolve().parents[1]
    with subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == f"mock upstream listening on http://127.0.0.1:{port}/v1"
            asyncio.run(_get_models(port))
        finally:
            proc.terminate()
            proc.wait(timeout=10)


async def _get_models(port: int) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/v1/models") as resp:
        assert resp.status == 200
