"""The cache storage seam: bytes by key, each with its expiry. Backends raise StoreError when storage fails.

Backends: `gateway.cache.redis_store.RedisCacheStore` (Redis, Cluster, Sentinel: Redis expires entries and
bounds its memory itself) and `gateway.cache.sqlite_store.SqliteCacheStore` (the embedded store: least
recently used entries go first past `max_bytes`). Expiry is also checked by the caller on the gateway's
clock, so an entry is never served past its `expires_at` whatever the backend's clock says.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

__all__ = ["CacheStore"]


class CacheStore(Protocol):
    """Where cache entries live; `bounds_time`: every call answers (or fails) within the store's own timeout,
    so the caller adds none."""

    bounds_time: bool

    def expect_ttl(self, ttl_s: float) -> None:
        """Entries may be written for `ttl_s` from now on (the config's; a reload may lengthen it)."""

    def may_hold(self, key: str, now: float) -> bool:
        """False only when the store surely holds nothing under `key` (a miss without a read)."""

    async def get(self, key: str, now: float) -> bytes | None:
        """The value stored under `key`, or None (never stored, expired by `now`, or evicted)."""

    def put(self, key: str, value: bytes, now: float, expires_at: float, max_bytes: int) -> Awaitable[None]:
        """Store `value` under `key` until `expires_at`; an embedded store keeps within `max_bytes`. Answers
        with a coroutine, or a future already on its way (bounded in time by the backend)."""

    async def close(self) -> None:
        """Release what the store holds open (not a client it shares with the budget store)."""
