"""Building the budget store and engine the config asks for."""

from __future__ import annotations

from pathlib import Path

from gateway.budget.engine import BudgetEngine
from gateway.budget.instrumented import InstrumentedStore, StoreObserver
from gateway.budget.journal import SpendJournal
from gateway.budget.redis_store import RedisBudgetStore, create_redis_client
from gateway.budget.sqlite_store import SqliteBudgetStore
from gateway.budget.store import BudgetStore
from gateway.clock import Clock
from gateway.config.model import StoreConfig

__all__ = ["create_store", "create_engine"]


def create_store(config: StoreConfig) -> BudgetStore:
    """Redis when a URL is configured, else the embedded SQLite file."""
    if config.url:
        client = create_redis_client(config.url, config.timeout_s, config.pool_size)
        return RedisBudgetStore(client, max_in_flight=config.pool_size,
                                ledger_max_entries=config.ledger_max_entries)
    Path(config.path).parent.mkdir(parents=True, exist_ok=True)
    return SqliteBudgetStore(config.path, ledger_max_entries=config.ledger_max_entries)


def create_engine(config: StoreConfig, clock: Clock, store: BudgetStore | None = None,
                  observe: StoreObserver | None = None) -> BudgetEngine:
    """The engine over `store` (or the configured one), journaling to the configured file.

    With `observe`, every store operation is timed and reported to it (see InstrumentedStore).
    """
    store = store or create_store(config)
    if observe is not None:
        store = InstrumentedStore(store, observe)
    return BudgetEngine(store, clock, config, SpendJournal(config.journal_path))
