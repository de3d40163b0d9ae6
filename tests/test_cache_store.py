"""The response cache's parts: its key, its storage backends (TTL on the injected clock, the embedded
store's bound on disk and in memory), the stream assembler and replay (issue 19)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import os
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest

from gateway.http.appkeys import CACHE
from gateway.cache.assemble import SLICE_BYTES, StreamAssembler, storable, storable_answer
from gateway.cache.control import control_of
from gateway.cache.entry import CacheEntry
from gateway.cache.keys import cache_key, scope_identity
from gateway.cache.memory import ENTRY_OVERHEAD, HOLD_S, MemoryFront
from gateway.cache.redis_store import RedisCacheStore
from gateway.cache.replay import MAX_PIECES, pieces, replay_events
from gateway.cache.service import ResponseCache
from gateway.cache.sqlite_store import SqliteCacheStore
from gateway.budget.redis_store import create_redis_client
from gateway.clock import FakeClock
from gateway.config.model import CacheConfig, CallerIdentity, StoreConfig
from gateway.domain.pricing import Usage
from tests.support.settings import make_settings

WEB = CallerIdentity("web-app", team="web")
LONE = CallerIdentity("lone-key")


def test_the_key_ignores_only_stream_fields_and_user_and_names_the_scope() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi", "name": "x"}], "temperature": 0}
    same = {"temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "user": "u",
            "messages": [{"name": "x", "content": "hi", "role": "user"}], "model": "m"}
    key = cache_key("chat", "m", "team:web", body)
    assert cache_key("chat", "m", "team:web", same) == key
    assert len({key, cache_key("completions", "m", "team:web", body), cache_key("chat", "m2", "team:web", body),
                cache_key("chat", "m", "team:data", body), cache_key("chat", "m", "team:web", {**body, "n": 2})}) == 5
    assert [scope_identity(scope, WEB) for scope in ("key", "team", "global")] == ["key:web-app", "team:web", "global"]
    assert scope_identity("team", LONE) == "key:lone-key"      # a key without a team shares with nobody


@pytest.mark.parametrize(("header", "read", "write"), [
    (None, True, True), ("max-age=60", True, True), ("no-cache", False, True), ("NO-CACHE, max-age=0", False, True),
    ("no-store", False, False), ("no-cache, no-store", False, False), ("no-store=1", False, False),
])
def test_cache_control_decides_reads_and_writes(header: str | None, read: bool, write: bool) -> None:
    assert tuple(control_of(header)) == (read, write)


# --- backends: TTL on the gateway's clock; the embedded bound -------------------------------------------------

@pytest.fixture(params=["embedded", "redis", "cluster"])
async def backend(request, tmp_path: Path) -> AsyncIterator[SqliteCacheStore | RedisCacheStore]:
    if request.param == "embedded":
        store: SqliteCacheStore | RedisCacheStore = SqliteCacheStore(str(tmp_path / "cache.db"))
    else:
        url = request.getfixturevalue("redis_url" if request.param == "redis" else "redis_cluster_url")
        store = RedisCacheStore(create_redis_client(url, 1.0, 8), owns_client=True)
    yield store
    await store.close()


async def test_an_entry_reads_back_until_its_expiry_and_is_replaced_by_a_put(backend) -> None:
    clock = FakeClock()
    await backend.put("k", b"first", clock.now(), clock.now() + 60, 1 << 20)
    await backend.put("k", b"second", clock.now(), clock.now() + 60, 1 << 20)
    assert await backend.get("k", clock.now()) == b"second"
    assert await backend.get("other", clock.now()) is None


async def test_ttl_expiry_on_the_injected_clock_turns_a_hit_into_a_miss(upstream, start_gateway, http, tmp_path,
                                                                       request) -> None:
    clock = FakeClock()
    cache = CacheConfig(ttl_s=60, models=("gpt-4o-mini",))
    for store in (StoreConfig(path=str(tmp_path / "b.db")), StoreConfig(url=request.getfixturevalue("redis_url"))):
        upstream.reset()
        gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store, cache=cache), clock=clock)
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "expire me"}]}
        results = []
        for advance in (0, 59, 1.5, 0):      # stored at t; hit at t+59; expired at t+60.5; stored again then
            clock.advance(advance)
            reply = await http(gateway, "POST", "/v1/chat/completions", json=body)
            results.append(reply.headers["x-gateway-cache"])
            await gateway.app[CACHE].written()
        assert results == ["miss", "hit", "miss", "hit"], store
        assert len(upstream.requests) == 2


async def test_the_embedded_store_evicts_least_recently_used_past_its_bound(tmp_path: Path) -> None:
    store, clock = SqliteCacheStore(str(tmp_path / "cache.db")), FakeClock()
    bound, value = 256 * 1024, os.urandom(4096)
    try:
        for index in range(200):             # 800 KiB of entries into a 256 KiB store
            await store.put(f"k{index}", value, clock.now(), clock.now() + 3600, bound)
            if index >= 10:
                assert await store.get("k0", clock.now()) == value   # used again and again: never evicted
            assert store.stored_bytes() <= bound
        present = [index for index in range(200) if await store.get(f"k{index}", clock.now()) is not None]
    finally:
        await store.close()
    assert 0 in present and 199 in present and 1 not in present       # the least recently used went first
    assert 20 < len(present) < 64                                      # the bound holds about 56 of 4 KiB


async def test_the_embedded_store_keeps_entries_on_disk_not_in_memory(tmp_path: Path) -> None:
    store, clock = SqliteCacheStore(str(tmp_path / "cache.db")), FakeClock()
    bound = 4 * 1024 * 1024
    await store.put("warm-up", b"x", clock.now(), clock.now() + 3600, bound)
    tracemalloc.start()
    try:
        for index in range(64):              # 16 MiB written into a 4 MiB store, each entry read back once
            await store.put(f"k{index}", os.urandom(256 * 1024), clock.now(), clock.now() + 3600, bound)
            await store.get(f"k{index}", clock.now())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await store.close()
    assert peak < bound / 4                  # about the one entry in flight, never the stored ones
    assert store.stored_bytes() <= bound


async def test_a_gateway_on_the_embedded_store_stays_within_max_bytes(upstream, start_gateway, http, tmp_path):
    cache = CacheConfig(models=("gpt-4o-mini",), max_entry_bytes=8 * 1024, max_bytes=64 * 1024)
    gateway = await start_gateway(make_settings({"primary": upstream.url}, cache=cache,
                                                store=StoreConfig(path=str(tmp_path / "b.db"))))
    for index in range(250):                 # answers of ~600 bytes: about 150 KiB in all
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"prompt {index}"}]}
        assert (await http(gateway, "POST", "/v1/chat/completions", json=body)).status == 200
        await gateway.app[CACHE].written()
    store = gateway.app[CACHE].store
    assert isinstance(store, SqliteCacheStore) and store.path == str(tmp_path / "b-cache.db")
    assert 0 < store.stored_bytes() <= cache.max_bytes
    for index, result in ((249, "hit"), (0, "miss")):     # the newest stayed; the oldest was evicted
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"prompt {index}"}]}
        assert (await http(gateway, "POST", "/v1/chat/completions", json=body)).headers["x-gateway-cache"] == result


# --- streams: joined as relayed, replayed as a provider sends them -----------------------------------------------

def _events(*chunks: dict) -> bytes:
    return b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks) + b"data: [DONE]\n\n"


def _chunk(delta: dict, finish: str | None = None) -> dict:
    return {"id": "c1", "object": "chat.completion.chunk", "created": 7, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def test_tool_call_deltas_are_joined_into_the_whole_answer_and_replayed() -> None:
    stream = _events(_chunk({"role": "assistant", "content": None}),
                     _chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                             "function": {"name": "get_weather", "arguments": ""}}]}),
                     _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
                     _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
                     _chunk({}, "tool_calls"))
    assembler = StreamAssembler(1 << 20)
    for at in range(0, len(stream), 50):     # fed in pieces that cut events in two
        assembler.feed(stream[at:at + 50])
    answer = assembler.answer(Usage(10, 5))
    assert answer is not None
    message = orjson.loads(answer)["choices"][0]["message"]
    assert message["tool_calls"] == [{"type": "function", "id": "call_1",
                                      "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    replayed = StreamAssembler(1 << 20)
    events = replay_events(answer, Usage(10, 5), wants_usage=False)
    assert events is not None
    replayed.feed(events)
    assert replayed.answer(Usage(10, 5)) == answer


def test_a_stream_with_comments_or_unspaced_data_lines_is_joined_as_the_usual_one() -> None:
    chunks = [_chunk({"role": "assistant", "content": ""}), _chunk({"content": "Hello"}),
              _chunk({"content": " there"}), _chunk({}, "stop")]
    usual = StreamAssembler(1 << 20)
    usual.feed(_events(*chunks))
    unusual = StreamAssembler(1 << 20)
    unusual.feed(b": keep-alive\n\n" + b"".join(b"data:" + orjson.dumps(chunk) + b"\n\n" for chunk in chunks)
                 + b"data: [DONE]\n\n")
    answer = usual.answer(Usage(10, 5))
    assert answer is not None and unusual.answer(Usage(10, 5)) == answer
    assert orjson.loads(answer)["choices"][0]["message"]["content"] == "Hello there"


@pytest.mark.parametrize("stream", [
    _events(_chunk({"content": "I can't"}), _chunk({}, "content_filter")),
    _events(_chunk({"role": "assistant", "refusal": "I can't help with that."}), _chunk({}, "stop")),
    _events(_chunk({"audio": {"id": "a1", "data": "AAAA"}}), _chunk({}, "stop")),
    _events(_chunk({"content": "half"}))[:-len(b"data: [DONE]\n\n") - 10],
    b'data: {"error": {"message": "boom"}}\n\n',
    b"data: " + orjson.dumps(_chunk({"content": "one"})) + b", " + orjson.dumps(_chunk({}, "stop")) + b"\n\n"
    b"data: [DONE]\n\n",
    b"data: " + orjson.dumps(_chunk({"content": "half"}))[:-1] + b"\n\ndata: [DONE]\n\n",
    b"data: " + orjson.dumps(_chunk({"content": "A"}))[:-3] + b"\n\ndata: "
    + orjson.dumps(_chunk({"content": "A"}))[-3:] + b", " + orjson.dumps(_chunk({}, "stop")) + b"\n\ndata: [DONE]\n\n",
    *(_events({**_chunk({"content": "A"}), "choices": [{"index": index, "delta": {"content": "A"}}]}, _chunk({}, "stop"))
      for index in ([0], {"i": 0}, "0")),
    _events(_chunk({"content": "A"}))[:-len(b"data: [DONE]\n\n")] + b"data: [DONE]\n\n" + _events(_chunk({}, "stop")),
    _events({"choices": [{"index": 0, "delta": {"content": "INJECTED "}}]}, _chunk({"content": "Hi"}), _chunk({}, "stop")),
    _events(_chunk({"tool_calls": [{"index": True, "id": "call_1", "function": {"name": "f", "arguments": "{}"}}]}),
            _chunk({}, "tool_calls")),
    b'data: {"id": "c1", "object": "chat.completion.chunk", "created": 7, "model": "m", "choices": [{"index": 0, '
    b'"delta": {"role": ' + b"[" * 300 + b'"assistant"' + b"]" * 300 + b'}}]}\n\n' + _events(_chunk({}, "stop")),
], ids=["content_filter", "refusal", "unknown_delta", "cut_mid_event", "error_event", "two_values_in_one_event",
        "unreadable_event", "a_chunk_split_over_two_data_lines", "a_list_as_index", "an_object_as_index",
        "a_text_as_index", "done_before_the_end", "a_first_chunk_of_no_kind", "true_as_tool_call_index",
        "nested_deeper_than_json_is_written"])
def test_refusals_and_streams_the_gateway_does_not_understand_are_never_kept(stream: bytes) -> None:
    assembler = StreamAssembler(1 << 20)
    assembler.feed(stream)
    assert assembler.answer(Usage(10, 5)) is None


def test_a_stream_that_goes_on_after_a_done_in_an_earlier_slice_is_not_kept() -> None:
    # the client stops reading at the [DONE]: text sent after it, even a slice later, is no part of its answer
    head = _events(*[_chunk({"content": "x" * 100}) for _ in range(700)], _chunk({}, "stop"))
    tail = _events(_chunk({"content": "EVIL"}), _chunk({}, "stop"))
    assert len(head) > SLICE_BYTES
    for writes in ([head, tail], [head + tail]):
        assembler = StreamAssembler(1 << 24)
        for data in writes:
            assembler.feed(data)
        assert assembler.answer(Usage(10, 5)) is None
    whole = StreamAssembler(1 << 24)
    whole.feed(head)
    assert orjson.loads(whole.answer(Usage(10, 5)) or b"null")["choices"][0]["message"]["content"] == "x" * 70_000


def test_a_stream_relaying_past_its_limit_is_given_up() -> None:
    assembler = StreamAssembler(1000)
    assembler.feed(_events(*[_chunk({"content": "word "}) for _ in range(50)], _chunk({}, "stop")))
    assert assembler.answer(Usage(10, 50)) is None


def test_a_long_stream_is_joined_a_slice_at_a_time_within_little_memory() -> None:
    pieces = [_chunk({"content": f"w{i} "}) for i in range(20_000)] + [_chunk({}, "stop")]
    assembler = StreamAssembler(64 << 20)
    tracemalloc.start()
    try:
        for at in range(0, len(pieces), 100):        # fed as relayed: 100 events a write, ~5 MiB in all
            assembler.feed(b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in pieces[at:at + 100]))
        assembler.feed(b"data: [DONE]\n\n")
        answer = assembler.answer(Usage(10, 20_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert answer is not None
    assert orjson.loads(answer)["choices"][0]["message"]["content"] == "".join(f"w{i} " for i in range(20_000))
    assert peak < 2 << 20                            # never the whole stream's bytes, nor all its chunks parsed


def _join_seconds(pieces: int, delta: Callable[[int], dict]) -> float:
    """The best of three joins of a stream of `pieces` chunks made by `delta`, fed 4 KiB a write, in seconds."""
    stream = _events(*[_chunk(delta(i)) for i in range(pieces)], _chunk({}, "stop"))
    best = math.inf
    for _ in range(3):
        assembler = StreamAssembler(64 << 20)
        started = time.perf_counter()
        for at in range(0, len(stream), 4096):
            assembler.feed(stream[at:at + 4096])
        answer = assembler.answer(Usage(10, pieces))
        best = min(best, time.perf_counter() - started)
        assert answer is not None
    return best


@pytest.mark.parametrize("delta", [
    pytest.param(lambda i: {"content": "x" * 160}, id="content"),
    pytest.param(lambda i: {"tool_calls": [{"index": 0, "function": {"arguments": "y" * 160}}]}, id="tool_arguments"),
])
def test_a_long_answer_in_many_chunks_is_joined_in_time_linear_in_its_length(delta: Callable[[int], dict]) -> None:
    # adding each piece to one string copied the whole text per chunk: 20,000 chunks of 160 characters took
    # about 16 times as long as 5,000 (seconds of the event loop for an answer the cache could not even keep)
    assert _join_seconds(20_000, delta) < 8 * _join_seconds(5_000, delta)


def test_a_completions_answer_replays_as_text_completion_chunks() -> None:
    answer = orjson.dumps({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                           "choices": [{"text": "one two three four five six seven", "index": 0, "logprobs": None,
                                        "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 2, "completion_tokens": 7, "total_tokens": 9}})
    events = replay_events(answer, Usage(2, 7), wants_usage=True)
    assert events is not None
    chunks = [orjson.loads(event[6:]) for event in events.split(b"\n\n")[:-2]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "one two three four five six seven"
    assert chunks[-1] == {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": [],
                          "usage": {"prompt_tokens": 2, "completion_tokens": 7, "total_tokens": 9}}
    assert replay_events(orjson.dumps({"object": "list", "data": []}), Usage(1), wants_usage=False) is None


def test_a_long_answer_replays_in_at_most_about_max_pieces_events_with_the_same_content() -> None:
    # cut into 16-character pieces, a 1 MB answer made 65,000 events (8.9 MB, 0.13 s of the event loop)
    content = "".join(f"word{i} " for i in range(150_000))
    answer = orjson.dumps({"id": "c1", "object": "chat.completion", "created": 7, "model": "m",
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                        "finish_reason": "stop"}]})
    events = replay_events(answer, Usage(10, 150_000), wants_usage=False)
    assert events is not None
    chunks = [orjson.loads(event[6:]) for event in events.split(b"\n\n")[:-2]]
    assert MAX_PIECES // 2 < len(chunks) <= MAX_PIECES + 2       # role, pieces, finish
    assert len(events) < 2 * len(answer)
    assert "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks) == content
    short = replay_events(answer.replace(content.encode(), b"one two three four five six seven eight"),
                          Usage(10, 8), wants_usage=False) or b""
    assert short.count(b'"content":"') == 3                       # the role's, then two pieces of 16 or more
    assert [piece for piece in pieces("one two three four five six seven eight")] == [
        "one two three four ", "five six seven eight"]


def test_the_cache_config_refuses_an_entry_larger_than_the_store() -> None:
    with pytest.raises(ValueError, match="must be <= max_bytes"):
        CacheConfig(max_entry_bytes=2048, max_bytes=1024)
    assert dataclasses.replace(CacheConfig(), models=("gpt-4o*",)).caches("gpt-4o-mini")


async def test_a_gateway_on_redis_cluster_keeps_answers_in_the_cluster(upstream, start_gateway, http,
                                                                       redis_cluster_url) -> None:
    store = StoreConfig(url=redis_cluster_url, reserve_ahead=False)
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store,
                                                cache=CacheConfig(models=("gpt-4o-mini",))))
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "cluster"}]}
    results = []
    for _ in range(3):
        results.append((await http(gateway, "POST", "/v1/chat/completions", json=body)).headers["x-gateway-cache"])
        await gateway.app[CACHE].written()
    assert results == ["miss", "hit", "hit"] and len(upstream.requests) == 1
    assert isinstance(gateway.app[CACHE].store, RedisCacheStore)


class _HeldWrites:
    """A store that holds nothing and answers each write when the test says (`writes`, in order)."""

    bounds_time = True

    def __init__(self) -> None:
        self.writes: list[asyncio.Future[None]] = []

    def expect_ttl(self, ttl_s: float) -> None:
        pass

    def may_hold(self, key: str, now: float) -> bool:
        return False

    async def get(self, key: str, now: float) -> bytes | None:
        return None

    def put(self, key: str, value: bytes, now: float, expires_at: float, max_bytes: int) -> asyncio.Future[None]:
        self.writes.append(asyncio.get_running_loop().create_future())
        return self.writes[-1]

    async def close(self) -> None:
        pass


def _whole(content: str) -> bytes:
    return orjson.dumps({"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]})


async def test_a_failed_write_or_a_late_follower_never_replaces_a_newer_answer_held_in_memory() -> None:
    store, clock = _HeldWrites(), FakeClock()
    cache = ResponseCache(store, clock, 1.0)
    config = CacheConfig(models=("m",))
    ask = functools.partial(cache.lookup, config, WEB, "chat", "m", {"prompt": "p"}, False, False)
    first = await ask(None)
    follower = asyncio.ensure_future(ask(None))
    await asyncio.sleep(0)                           # one loop turn: the follower waits on the first's flight
    assert first is not None and first.result == "miss"
    cache.finish(first, config, _whole("old"), Usage(1, 1), 10)
    clock.advance(1)
    refresh = await ask("no-cache")                  # before the follower wakes: a newer answer is held
    assert refresh is not None and refresh.result == "bypass"
    cache.finish(refresh, config, _whole("new"), Usage(1, 1), 10)
    hit = await follower                             # it waited on the old answer and gets it ...
    assert hit is not None and hit.entry is not None and orjson.loads(hit.entry.body)["choices"][0]["message"][
        "content"] == "old"
    store.writes[0].set_exception(ConnectionError("store out"))     # ... and the old answer's write fails
    store.writes[1].set_result(None)
    await cache.written()
    await asyncio.sleep(0)                           # the writes' callbacks run
    held = cache.held_hit(first.key, False, False)   # neither put the old answer back over the new one
    assert held is not None and held.entry is not None and b'"new"' in held.entry.body


def test_the_memory_front_is_bounded_in_bytes_and_in_held_time() -> None:
    front, now = MemoryFront(), 1000.0
    entry = CacheEntry(b"x" * 1000, Usage(1, 1), 5, now, now + 3600)
    limit = 10 * (1000 + ENTRY_OVERHEAD)
    for index in range(30):
        front.put(f"k{index}", entry, now, limit)
        assert front.get("k0", now) is entry                      # used again and again: kept
        assert front.bytes <= limit
    assert len(front) == 10 and front.get("k1", now) is None and front.get("k29", now) is entry
    assert front.get("k29", now + HOLD_S) is None                 # held at most HOLD_S, then read from the store
    short = CacheEntry(b"y", Usage(1, 1), 5, now, now + 2)
    front.put("short", short, now, limit)
    assert front.get("short", now + 1) is short and front.get("short", now + 2) is None


def _chat_entry(text: str, now: float) -> CacheEntry:
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    return CacheEntry(orjson.dumps(answer), Usage(3, 4), 5, now, now + 3600)


def test_a_held_entry_keeps_its_replays_within_the_front_bound_and_a_new_entry_replays_its_own() -> None:
    front, now = MemoryFront(), 1000.0
    first, second = _chat_entry("first answer " * 20, now), _chat_entry("second answer " * 20, now)
    front.put("k", first, now, 1 << 20)
    with_usage = front.replay("k", first, True)
    assert with_usage == replay_events(first.body, first.usage, True) and front.replay("k", first, True) is with_usage
    without = front.replay("k", first, False)
    assert without == replay_events(first.body, first.usage, False) != with_usage
    assert front.bytes == len(first.body) + ENTRY_OVERHEAD + len(with_usage) + len(without)

    front.put("k", second, now, 1 << 20)                           # a refreshed entry: its own replays
    assert front.replay("k", second, True) == replay_events(second.body, second.usage, True)
    assert front.replay("k", first, True) == with_usage            # an entry no longer held: made, not kept
    assert front.bytes == len(second.body) + ENTRY_OVERHEAD + len(front.replay("k", second, True))

    sizes = [len(entry.body) + ENTRY_OVERHEAD for entry in (first, second)]
    small = sum(sizes) + len(replay_events(second.body, second.usage, True)) - 1
    front = MemoryFront()
    front.put("a", first, now, small)
    front.put("b", second, now, small)
    front.replay("b", second, True)                               # its replay takes the room of the oldest
    assert front.get("a", now) is None and front.get("b", now) is second and front.bytes <= small


@pytest.mark.parametrize(("answer", "kept"), [
    ({"choices": [{"message": {"content": "fine", "refusal": None}, "finish_reason": "stop"}]}, True),
    ({"choices": [{"message": {"content": 'say "refusal": no, "finish_reason": "content_filter"'},
                   "finish_reason": "stop"}]}, True),
    ({"choices": [{"message": {"content": None, "refusal": "I can't help"}, "finish_reason": "stop"}]}, False),
    ({"choices": [{"message": {"content": ""}, "finish_reason": "content_filter"}]}, False),
    ({"choices": [{"message": {"content": "a", "refusal": None}, "finish_reason": "stop"},
                  {"message": {"content": None, "refusal": "No"}, "finish_reason": "stop"}]}, False),
], ids=["answer", "words_in_the_text", "refusal", "content_filter", "second_choice_refuses"])
def test_a_whole_answer_is_kept_unless_it_is_a_refusal(answer: dict, kept: bool) -> None:
    body = orjson.dumps(answer)
    assert storable_answer(body) is storable(answer) is kept
    assert storable_answer(orjson.dumps(answer, option=orjson.OPT_INDENT_2)) is kept


@pytest.mark.parametrize(("answer", "kept"), [
    ({"type": "message", "content": [{"type": "text", "text": "fine"}], "stop_reason": "end_turn"}, True),
    ({"type": "message", "content": [], "stop_reason": "refusal"}, False),
    ({"object": "response", "output": [{"type": "message", "content": [{"type": "output_text", "text": "ok"}]}]},
     True),
    ({"object": "response", "output": [{"type": "message", "content": [{"type": "refusal", "refusal": "no"}]}]},
     False),
], ids=["messages", "messages_refusal", "responses", "responses_refusal"])
def test_a_whole_responses_or_messages_answer_is_kept_unless_it_is_a_refusal(answer: dict, kept: bool) -> None:
    assert storable_answer(orjson.dumps(answer)) is kept
