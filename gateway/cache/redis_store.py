"""Cache entries on Redis, Redis Cluster or a Sentinel master: one GET or one SET PX per call.

Keys are `<prefix>:cache:<hash>` without a hash tag, so on a Cluster entries spread over every slot (the
budget keys share one slot; the cache has no atomic operation across keys). Redis drops an entry at its
expiry (plus a second, the caller checks expiry on its own clock) and bounds its memory with its own
`maxmemory` policy: `cache.max_bytes` does not apply here.
"""

from __future__ import annotations

import math

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

from gateway.errors import StoreError

__all__ = ["RedisCacheStore"]

_SLACK_MS = 1000


class RedisCacheStore:
    """CacheStore on a redis-py asyncio client (the budget store's own, when it has one)."""

    def __init__(self, client: Redis | RedisCluster, *, prefix: str = "gw", owns_client: bool = False) -> None:
        self._client = client
        self._prefix = f"{prefix}:cache:"
        self._owns_client = owns_client

    async def get(self, key: str, now: float) -> bytes | None:
        """The stored value, or None."""
        try:
            value = await self._client.get(self._prefix + key)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis cache read failed: {type(exc).__name__}") from exc
        return value if isinstance(value, bytes) or value is None else str(value).encode()

    async def put(self, key: str, value: bytes, now: float, expires_at: float, max_bytes: int) -> None:
        """SET with an expiry of what is left of the entry's time to live."""
        ttl_ms = max(1, math.ceil((expires_at - now) * 1000)) + _SLACK_MS
        try:
            await self._client.set(self._prefix + key, value, px=ttl_ms)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis cache write failed: {type(exc).__name__}") from exc

    async def close(self) -> None:
        """Close the client if this store made it."""
        if self._owns_client:
            await self._client.aclose()
