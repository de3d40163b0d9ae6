"""The cache key index: a miss on Redis costs no store read once the replica knows every key the store may
hold, from its own writes and Redis's news of everyone's (client tracking); whatever goes wrong with the
news, lookups read the store again (issue 19, acceptance 8)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable

import orjson
import pytest
import redis.asyncio as aioredis

from gateway.budget.redis_store import create_redis_client
from gateway.cache import redis_store, redis_tracking
from gateway.cache.entry import CacheEntry, encode
from gateway.cache.key_index import BUCKETS, KeyIndex
from gateway.cache.keys import cache_key, scope_identity
from gateway.cache.redis_store import RedisCacheStore
from gateway.cache.service import ResponseCache
from gateway.clock import FakeClock
from gateway.config.model import CacheConfig, CallerIdentity, StoreConfig
from gateway.domain.pricing import Usage
from gateway.http.appkeys import CACHE
from tests.test_response_cache import CHAT, post, settings_for

CONFIG = CacheConfig(models=("m",))
CALLER = CallerIdentity("web-app", team="web")
ENTRY = encode(CacheEntry(b'{"id": "x"}', Usage(3, 4), 1000, 0.0, 1e12))


async def until(condition: Callable[[], bool], within_s: float = 10.0) -> None:
    """Wait for `condition` (news from Redis arrives on its own connection); fail after `within_s`."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- the index itself, on the injected clock -----------------------------------------------------------------

def test_a_ready_index_rules_out_only_keys_it_never_saw() -> None:
    index = KeyIndex(horizon_s=60)
    index.add("written", 0.0)
    assert index.may_hold("never", 0.0)              # not ready yet: anything may be held
    index.ready = True
    assert (index.may_hold("written", 1.0), index.may_hold("never", 1.0)) == (True, False)


def test_a_key_stays_for_its_time_to_live_and_goes_with_its_bucket() -> None:
    index = KeyIndex(horizon_s=60)
    index.ready = True
    index.add("old", 0.0)
    index.add("new", 61.0)                           # 61 s later: "old" may still be held (Redis keeps a slack)
    assert index.may_hold("old", 61.0) and len(index) == 2
    gone = 62.0 + 62.0 / BUCKETS                     # its bucket ends a horizon after it closed
    index.add("newer", gone)
    assert (index.may_hold("old", gone), index.may_hold("new", gone), len(index)) == (False, True, 2)


def test_a_key_added_late_in_its_bucket_still_stays_its_whole_time_to_live() -> None:
    index = KeyIndex(horizon_s=60)
    index.ready = True
    index.add("first", 0.0)
    late = 62.0 / BUCKETS - 0.001                    # the last moment of the first bucket
    index.add("late", late)
    index.add("now", late + 62.0)                    # its whole time to live (and Redis's slack) later
    assert index.may_hold("late", late + 62.0)


def test_a_longer_time_to_live_written_or_configured_keeps_keys_longer() -> None:
    written, configured = KeyIndex(horizon_s=60), KeyIndex(horizon_s=60)
    configured.expect_ttl(3600)                      # a reload to a longer ttl_s, before any write
    for index in (written, configured):
        index.ready = True
        index.add("long", 0.0, ttl_s=3600 if index is written else None)
        index.add("later", 1000.0)
        assert index.may_hold("long", 1000.0)


def test_past_its_bound_every_key_may_be_held_until_those_left_out_expired() -> None:
    index = KeyIndex(horizon_s=60, max_keys=2)
    index.ready = True
    for key in ("a", "b", "left-out"):
        index.add(key, 0.0)
    assert len(index) == 2 and index.may_hold("never", 10.0)
    index.add("c", 200.0)                            # the left-out key expired: the index is sure again
    assert not index.may_hold("never", 200.0) and index.may_hold("c", 200.0)
    index.add_all(["c", "d", "e"], 201.0)            # a batch of news past the bound: held up to it, then unsure
    assert len(index) == 2 and index.may_hold("never", 202.0)


# --- on Redis -------------------------------------------------------------------------------------------------

@pytest.fixture
async def redis_stores(fresh_redis_server) -> AsyncIterator[Callable[[], RedisCacheStore]]:
    """Cache stores on a redis-server of this test alone, each its own replica's; closed at the end."""
    made: list[RedisCacheStore] = []

    def make() -> RedisCacheStore:
        made.append(RedisCacheStore(create_redis_client(fresh_redis_server.url, 1.0, 8), owns_client=True))
        return made[-1]

    yield make
    for store in made:
        await store.close()


async def ready(store: RedisCacheStore) -> RedisCacheStore:
    """The store once its index is filled (tracking starts at its first lookup)."""
    store.may_hold("start", time.time())
    await until(lambda: store.index.ready)
    return store


async def reads(server) -> int:
    """Script calls (the cache's GETs and SETs) the Redis server has run so far."""
    async with aioredis.from_url(server.url) as client:
        stats = await client.info("commandstats")
    return stats.get("cmdstat_evalsha", {}).get("calls", 0)


async def test_a_miss_on_a_ready_index_reads_nothing_and_a_written_key_is_read(fresh_redis_server,
                                                                             redis_stores) -> None:
    store = await ready(redis_stores())
    cache = ResponseCache(store, FakeClock(), 1.0)
    before = await reads(fresh_redis_server)
    miss = await cache.lookup(CONFIG, CALLER, "chat", "m", {"prompt": "never asked"}, False, False, None)
    assert miss is not None and miss.result == "miss"
    assert await reads(fresh_redis_server) == before
    await store.put("k", ENTRY, time.time(), time.time() + 60, 1 << 20)
    cache.memory = type(cache.memory)()              # not held in memory: only the store can answer
    assert store.may_hold("k", time.time()) and await store.get("k", time.time()) == ENTRY


async def test_a_miss_holds_nothing_in_memory_a_hit_read_from_the_store_is_held_and_a_refresh_replaces_it(
        fresh_redis_server, redis_stores) -> None:
    cache = ResponseCache(await ready(redis_stores()), FakeClock(), 1.0)
    ask = functools.partial(cache.lookup, CONFIG, CALLER, "chat", "m", {"prompt": "asked twice"}, False, False)
    miss = await ask(None)
    assert miss is not None and miss.result == "miss"
    cache.finish(miss, CONFIG, b'{"id": "first"}', Usage(3, 4), 1000)
    await cache.written()
    assert len(cache.memory) == 0                    # most answers are never asked for again: none is held
    counts = [await reads(fresh_redis_server)]
    hits = []
    for _ in range(2):
        hits.append(await ask(None))
        counts.append(await reads(fresh_redis_server))
    assert [(hit.result, hit.entry.body) for hit in hits if hit and hit.entry] == [("hit", b'{"id": "first"}')] * 2
    assert counts[1] > counts[0] and counts[2] == counts[1]   # the first hit read the store; the next, memory
    refresh = await ask("no-cache")
    assert refresh is not None and refresh.result == "bypass"
    cache.finish(refresh, CONFIG, b'{"id": "second"}', Usage(3, 4), 1000)
    await cache.written()
    held = cache.held_hit(miss.key, False, False)    # the refreshed answer, never the one held before
    assert held is not None and held.entry is not None and held.entry.body == b'{"id": "second"}'


async def test_an_answer_asked_for_again_while_it_was_fetched_is_held_and_replayed_once(fresh_redis_server,
                                                                                        redis_stores) -> None:
    cache = ResponseCache(await ready(redis_stores()), FakeClock(), 1.0)
    ask = functools.partial(cache.lookup, CONFIG, CALLER, "chat", "m", {"prompt": "asked at once"})
    leader = await ask(False, False, None)
    assert leader is not None and leader.result == "miss"
    followers = [asyncio.ensure_future(ask(True, False, None)) for _ in range(3)]
    await asyncio.sleep(0)                           # one loop turn: each follower now waits on the leader's flight
    answer = orjson.dumps({"id": "x", "object": "chat.completion", "created": 1, "model": "m",
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there"},
                                        "finish_reason": "stop"}]})
    cache.finish(leader, CONFIG, answer, Usage(3, 4), 1000)
    hits = await asyncio.gather(*followers)
    assert [hit.result for hit in hits if hit] == ["hit"] * 3
    assert len(cache.memory) == 1                    # asked for again: held, unlike an answer nobody asked twice
    assert hits[0].events is not None and all(hit.events is hits[0].events for hit in hits)   # replayed once


async def test_news_arriving_while_the_connection_rests_is_read_in_one_batch_when_it_ends(redis_stores,
                                                                                        monkeypatch) -> None:
    monkeypatch.setattr(redis_tracking, "NEWS_EVERY_S", 0.5)
    writer, reader = await ready(redis_stores()), await ready(redis_stores())
    now = time.time()
    await writer.put("first", ENTRY, now, now + 60, 1 << 20)
    await until(lambda: reader.may_hold("first", now))     # a quiet connection reads its news at once
    rested_from = time.monotonic()
    burst = [f"burst-{i}" for i in range(10)]
    for key in burst:                                # ten writes, each its own news message
        await writer.put(key, ENTRY, now, now + 60, 1 << 20)
    assert not any(reader.may_hold(key, now) for key in burst)   # resting: the news waits in the socket
    await until(lambda: reader.may_hold(burst[0], now))
    assert all(reader.may_hold(key, now) for key in burst)       # read together, in one batch
    assert time.monotonic() - rested_from >= 0.45


async def test_a_replica_learns_keys_written_before_it_started_and_by_others_since(redis_stores) -> None:
    first = await ready(redis_stores())
    now = time.time()
    await first.put("before", ENTRY, now, now + 60, 1 << 20)
    await first.put("gone", ENTRY, now, now + 60, 1 << 20)
    await first._client.delete("gw:cache:gone")
    second = await ready(redis_stores())
    assert (second.may_hold("before", now), second.may_hold("gone", now)) == (True, False)
    await first.put("since", ENTRY, now, now + 60, 1 << 20)
    await until(lambda: second.may_hold("since", now))
    assert await second.get("since", now) == ENTRY


async def test_the_index_is_ready_only_once_every_key_already_there_is_in_it(fresh_redis_server, monkeypatch) -> None:
    names = [f"old-{i}" for i in range(50)]
    async with aioredis.from_url(fresh_redis_server.url) as client:
        await client.mset({f"gw:cache:{name}": ENTRY for name in names})
    seen: list[list[bool]] = []

    class Probe(KeyIndex):
        """Records, the moment it turns ready, which of the old keys it may hold."""

        @property
        def ready(self) -> bool:
            return self.__dict__.get("_probe_ready", False)

        @ready.setter
        def ready(self, value: bool) -> None:
            self.__dict__["_probe_ready"] = value
            if value:
                seen.append([self.may_hold(name, time.time()) for name in names])

    monkeypatch.setattr(redis_store, "KeyIndex", Probe)
    monkeypatch.setattr(redis_tracking, "SCAN_COUNT", 1)  # a SCAN of many steps, news may come between them
    store = RedisCacheStore(create_redis_client(fresh_redis_server.url, 1.0, 8), owns_client=True)
    try:
        await ready(store)
        assert seen == [[True] * len(names)]
    finally:
        await store.close()


async def test_a_frozen_redis_makes_the_index_unready_until_it_answers_again(fresh_redis_server, redis_stores,
                                                                             monkeypatch) -> None:
    monkeypatch.setattr(redis_tracking, "HEALTH_S", 0.2)      # silence, then a PING unanswered for as long
    store = await ready(redis_stores())
    fresh_redis_server.pause()
    try:
        await until(lambda: not store.index.ready)
        assert store.may_hold("never", time.time())
    finally:
        fresh_redis_server.resume()
    await until(lambda: store.index.ready)


async def test_a_closed_store_never_starts_tracking(fresh_redis_server) -> None:
    store = RedisCacheStore(create_redis_client(fresh_redis_server.url, 1.0, 8), owns_client=True)
    await store.close()
    assert store.may_hold("k", time.time()) and store._tracker is not None and store._tracker._task is None


async def test_a_flush_of_another_database_refills_the_index_over_the_same_connection(fresh_redis_server,
                                                                                   redis_stores) -> None:
    store = await ready(redis_stores())
    await store.put("kept", ENTRY, time.time(), time.time() + 60, 1 << 20)
    store.index.add("phantom", time.time())          # in the index, not in Redis: a refill drops it
    async with aioredis.from_url(fresh_redis_server.url) as client:
        before = await client.client_list(_type="pubsub")
        async with aioredis.from_url(fresh_redis_server.url + "/1") as other:
            await other.flushdb()                    # the news says "flushed", not which database
        await until(lambda: store.index.ready and not store.may_hold("phantom", time.time()))
        assert store.may_hold("kept", time.time()) and not store.may_hold("never", time.time())
        assert [c["id"] for c in await client.client_list(_type="pubsub")] == [c["id"] for c in before]


async def test_a_lost_tracking_connection_reads_every_key_until_the_index_is_filled_again(
        fresh_redis_server, redis_stores) -> None:
    store = await ready(redis_stores())
    async with aioredis.from_url(fresh_redis_server.url) as client:
        await client.client_kill_filter(_type="pubsub")
        await until(lambda: not store.index.ready)
        await client.set("gw:cache:meanwhile", ENTRY)    # written while no news came: read, not ruled out
    assert store.may_hold("meanwhile", time.time())
    assert await store.get("meanwhile", time.time()) == ENTRY
    await until(lambda: store.index.ready)
    assert store.may_hold("meanwhile", time.time()) and not store.may_hold("never", time.time())


async def test_a_restarted_or_flushed_redis_refills_the_index(fresh_redis_server, redis_stores) -> None:
    store = await ready(redis_stores())
    await store.put("k", ENTRY, time.time(), time.time() + 60, 1 << 20)
    fresh_redis_server.restart()                     # no persistence: the entry is gone with it
    await until(lambda: not store.index.ready)
    await until(lambda: store.index.ready, within_s=20)
    assert not store.may_hold("k", time.time())
    async with aioredis.from_url(fresh_redis_server.url) as client:
        await client.set("gw:cache:after", ENTRY)
        await until(lambda: store.may_hold("after", time.time()))
        await client.flushall()
    await until(lambda: not store.may_hold("after", time.time()))
    assert store.index.ready


async def test_a_redis_user_that_may_not_track_keys_reads_every_lookup(fresh_redis_server, caplog) -> None:
    async with aioredis.from_url(fresh_redis_server.url) as admin:
        await admin.acl_setuser("cacheonly", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                                commands=["+@all", "-client"])
    url = fresh_redis_server.url.replace("redis://", "redis://cacheonly:pw@")
    store = RedisCacheStore(create_redis_client(url, 1.0, 8), owns_client=True)
    try:
        store.may_hold("start", time.time())
        await until(lambda: "cannot track keys" in caplog.text)
        await store.put("k", ENTRY, time.time(), time.time() + 60, 1 << 20)
        assert not store.index.ready and store.may_hold("never", time.time())
        assert await store.get("k", time.time()) == ENTRY
    finally:
        await store.close()


async def test_a_cluster_store_reads_every_lookup(redis_cluster_url) -> None:
    store = RedisCacheStore(create_redis_client(redis_cluster_url, 1.0, 8), owns_client=True)
    try:
        assert store.may_hold("never", time.time()) and store._tracker is None
    finally:
        await store.close()


async def test_two_gateways_on_one_redis_share_an_answer_through_the_index(upstream, start_gateway, http,
                                                                          redis_url) -> None:
    settings = settings_for(upstream, StoreConfig(url=redis_url, reserve_ahead=False),
                            cache=CacheConfig(models=("gpt-4o-mini",)))
    first, second = await start_gateway(settings), await start_gateway(settings)
    for gateway in (first, second):
        await ready(gateway.app[CACHE].store)
    other = {**CHAT, "messages": [{"role": "user", "content": "Only the second gateway is asked this"}]}
    assert (await post(http, second, other)).headers["x-gateway-cache"] == "miss"
    assert (await post(http, first, CHAT)).headers["x-gateway-cache"] == "miss"
    await first.app[CACHE].written()
    key = cache_key("chat", "gpt-4o-mini", scope_identity("team", CALLER), CHAT)
    await until(lambda: second.app[CACHE].store.may_hold(key, time.time()))
    again = await post(http, second, CHAT)
    assert (again.status, again.headers["x-gateway-cache"], len(upstream.requests)) == (200, "hit", 2)
