"""Cache entries on Redis, Redis Cluster or a Sentinel master: one script call (a GET, or a SET PX) each.

A lookup reads only a key the store may hold: on Redis and Sentinel a KeyIndex, kept by the writes made
here and by Redis's news of everyone else's (redis_tracking), says which keys those are, so a miss costs
no store call once the index is ready. On a Cluster, or while the index is not ready, every lookup reads.

The calls go down the budget store's own driver when there is one (on Redis and Sentinel its auto-
pipelined connection: a call there costs the gateway a fraction of a pooled command), else down the
client's pool. Keys are `<prefix>:cache:<hash>` without a hash tag, so on a Cluster entries spread over
every slot (the budget keys share one slot; the cache has no operation across keys). Redis drops an entry
at its expiry (plus a second: the caller checks expiry on its own clock) and bounds its memory with its
own `maxmemory` policy: `cache.max_bytes` does not apply here.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

from gateway.budget.redis_driver import PublicApiDriver, ScriptDriver
from gateway.cache.key_index import KeyIndex
from gateway.cache.redis_tracking import KeyTracker
from gateway.clock import Clock, SystemClock
from gateway.config.model import CacheConfig
from gateway.errors import StoreError

__all__ = ["RedisCacheStore"]

_SLACK_MS = 1000
_GET = "return redis.call('GET', KEYS[1])"
_PUT = "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1"


class RedisCacheStore:
    """CacheStore on a redis-py asyncio client, through `driver` (the budget store's) or a driver of its own."""

    def __init__(self, client: Redis | RedisCluster, *, driver: ScriptDriver | None = None, prefix: str = "gw",
                 owns_client: bool = False, clock: Clock | None = None) -> None:
        self._client = client
        self._driver = driver or PublicApiDriver(client)
        self._get = client.register_script(_GET)
        self._put = client.register_script(_PUT)
        self._prefix = f"{prefix}:cache:"
        self._owns_client = owns_client
        self.bounds_time = self._driver.capabilities.bounds_time
        self.index = KeyIndex(CacheConfig().ttl_s)     # until the cache says its config's (expect_ttl)
        self._tracker = None if isinstance(client, RedisCluster) else \
            KeyTracker(client, self.index, self._prefix, clock or SystemClock())

    def expect_ttl(self, ttl_s: float) -> None:
        """Keep indexed keys at least `ttl_s` (the config's time to live, at start and at each reload)."""
        self.index.expect_ttl(ttl_s)

    def may_hold(self, key: str, now: float) -> bool:
        """False when the index knows the store cannot hold `key` (tracking starts at the first call)."""
        if self.index.ready:
            return self.index.may_hold(key, now)
        if self._tracker is not None:
            self._tracker.start()
        return True

    async def get(self, key: str, now: float) -> bytes | None:
        """The stored value, or None."""
        return await self._call(self._get, key, [], lazy=False)

    def put(self, key: str, value: bytes, now: float, expires_at: float, max_bytes: int) -> Awaitable[None]:
        """SET with an expiry of what is left of the entry's time to live: the driver's call, on its way
        (nobody waits for it: it may share a write with other calls)."""
        ttl_ms = max(1, math.ceil((expires_at - now) * 1000)) + _SLACK_MS
        self.index.add(key, now, expires_at - now)
        args: list[Any] = [value, str(ttl_ms)]   # the value goes as bytes (it is no text)
        return self._driver.submit(self._put, [self._prefix + key], args, None, None, True)

    async def _call(self, script: Any, key: str, args: list[Any], *, lazy: bool) -> Any:
        try:
            return await self._driver.submit(script, [self._prefix + key], args, None, None, lazy)
        except StoreError:
            raise
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis cache call failed: {type(exc).__name__}") from exc

    async def close(self) -> None:
        """Stop tracking keys; close the client if this store made it."""
        if self._tracker is not None:
            await self._tracker.close()
        if self._owns_client:
            await self._client.aclose()
