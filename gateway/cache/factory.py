"""The cache's storage, from the configured budget store: the same Redis (its client, and its driver: the
pipelined connection on Redis and Sentinel), or an embedded SQLite file beside the budget's."""

from __future__ import annotations

from gateway.budget.instrumented import InstrumentedStore
from gateway.budget.redis_store import RedisBudgetStore, create_redis_client
from gateway.budget.store import BudgetStore
from gateway.budget.store_calls import hard_timeout
from gateway.cache.redis_store import RedisCacheStore
from gateway.cache.service import ResponseCache
from gateway.cache.sqlite_store import SqliteCacheStore, cache_path
from gateway.cache.store import CacheStore
from gateway.clock import Clock
from gateway.config.model import StoreConfig

__all__ = ["create_cache_store", "create_cache"]


def create_cache_store(config: StoreConfig, budget_store: BudgetStore | None, clock: Clock) -> CacheStore:
    """The budget store's Redis client when it has one; else a client of the configured URL; else SQLite."""
    while isinstance(budget_store, InstrumentedStore):
        budget_store = budget_store.wrapped
    if isinstance(budget_store, RedisBudgetStore):
        return RedisCacheStore(budget_store.client, driver=budget_store.driver, clock=clock)
    if config.url:
        return RedisCacheStore(create_redis_client(config.url, config.timeout_s, config.pool_size), owns_client=True,
                               clock=clock)
    return SqliteCacheStore(cache_path(config.path))


def create_cache(config: StoreConfig, budget_store: BudgetStore | None, clock: Clock,
                 store: CacheStore | None = None) -> ResponseCache:
    """The response cache over `store` (or the one the store config implies); its calls bounded as the budget's."""
    return ResponseCache(store or create_cache_store(config, budget_store, clock), clock, hard_timeout(config))
