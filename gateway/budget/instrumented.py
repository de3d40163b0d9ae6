"""A budget store wrapper that times every operation for an observer (metrics subscribe; no Prometheus here)."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.budget.store import BudgetStore

__all__ = ["StoreObserver", "TIMED_OPERATIONS", "InstrumentedStore"]

StoreObserver = Callable[[str, float, bool], None]   # (operation, seconds, failed)
TIMED_OPERATIONS = ("reserve", "settle", "release", "record", "read", "ping", "close")


class InstrumentedStore:
    """A BudgetStore whose `TIMED_OPERATIONS` report their duration and failure to `observe`.

    A failure is any exception the operation raises (a cancelled call is not reported). Arguments and
    results pass through unchanged, and every other attribute is the wrapped store's own, untimed, so
    operations added to the protocol keep working.
    """

    def __init__(self, store: BudgetStore, observe: StoreObserver,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        self.wrapped = store
        self._observe = observe
        self._timer = timer

    def __getattr__(self, name: str) -> Any:
        """The wrapped store's attribute; a timed operation comes wrapped in `_timed`."""
        attribute = getattr(self.wrapped, name)
        if name in TIMED_OPERATIONS:
            return functools.partial(self._timed, name, attribute)
        return attribute

    async def _timed(self, operation: str, call: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        """Await the operation and report how long it took and whether it raised."""
        started = self._timer()
        try:
            result = await call(*args, **kwargs)
        except Exception:
            self._observe(operation, self._timer() - started, True)
            raise
        self._observe(operation, self._timer() - started, False)
        return result
