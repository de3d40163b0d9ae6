"""A budget store wrapper that times every operation for an observer (metrics subscribe; no Prometheus here)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.budget.store import BudgetStore

__all__ = ["StoreObserver", "TIMED_OPERATIONS", "InstrumentedStore"]

StoreObserver = Callable[[str, float, bool], None]   # (operation, seconds, failed)
TIMED_OPERATIONS = ("reserve", "reserve_spares", "settle", "release", "record", "read", "ping", "close")


class InstrumentedStore:
    """A BudgetStore whose `TIMED_OPERATIONS` report their duration and failure to `observe`.

    A failure is any exception the operation raises (a cancelled call is not reported). Arguments and
    results pass through unchanged, and every other attribute is the wrapped store's own, untimed, so
    operations added to the protocol keep working. An operation that answers with a future (a
    pipelined store call) is timed by a callback on it and handed back as it is.
    """

    def __init__(self, store: BudgetStore, observe: StoreObserver,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        self.wrapped = store
        self._observe = observe
        self._timer = timer
        # A store that times some operations itself (the pipelined Redis store) reports them directly.
        self_timed = store.observe_calls(observe) if hasattr(store, "observe_calls") else ()
        for name in TIMED_OPERATIONS:
            if not hasattr(store, name):
                continue
            operation = getattr(store, name)
            # Bound here either way: the request path then never falls through to __getattr__.
            setattr(self, name, operation if name in self_timed else functools.partial(self._timed, name, operation))

    def __getattr__(self, name: str) -> Any:
        """The wrapped store's untimed attribute."""
        return getattr(self.wrapped, name)

    def _timed(self, operation: str, call: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Awaitable[Any]:
        """Start the operation; its duration and outcome are reported when it ends."""
        started = self._timer()
        try:
            result = call(*args, **kwargs)
        except Exception:
            self._observe(operation, self._timer() - started, True)
            raise
        if isinstance(result, asyncio.Future):
            result.add_done_callback(functools.partial(self._future_done, operation, started))
            return result
        return self._awaited(operation, result, started)

    def _future_done(self, operation: str, started: float, future: asyncio.Future[Any]) -> None:
        if not future.cancelled():
            self._observe(operation, self._timer() - started, future.exception() is not None)

    async def _awaited(self, operation: str, call: Awaitable[Any], started: float) -> Any:
        try:
            result = await call
        except Exception:
            self._observe(operation, self._timer() - started, True)
            raise
        self._observe(operation, self._timer() - started, False)
        return result
