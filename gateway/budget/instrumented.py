"""A budget store wrapper that times every operation for an observer (metrics subscribe; no Prometheus here)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gateway.budget.canary_record import ArmTally, CanaryRecord, CanaryStatus
from gateway.budget.store import (
    BudgetStore, CounterKey, CounterState, LedgerEntry, OperationObserver, ReserveLine, ReserveOutcome,
)
from gateway.domain.pricing import Charge

__all__ = ["StoreObserver", "TIMED_OPERATIONS", "InstrumentedStore"]

StoreObserver = OperationObserver   # (operation, seconds, failed)
TIMED_OPERATIONS = ("reserve", "reserve_spares", "settle", "release", "record", "file_rows", "read", "ping", "close")


class InstrumentedStore:
    """A BudgetStore whose `TIMED_OPERATIONS` report their duration and failure to `observe`.

    A failure is any exception the operation raises (a cancelled call is not reported). Arguments and
    results pass through unchanged, and every attribute outside the protocol is the wrapped store's own,
    untimed. An operation the wrapped store times itself (its `capabilities.self_timed`) reports to
    `observe` directly and is bound straight to the store, so it costs nothing here; an operation that
    answers with a future (a call already on its way) is timed by a callback on it and handed back as it is.
    """

    def __init__(self, store: BudgetStore, observe: OperationObserver,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        self.wrapped = store
        self.capabilities = store.capabilities
        self._observe = observe
        self._timer = timer
        if self.capabilities.self_timed:
            store.observe_calls(observe)
            operations = {"reserve": store.reserve, "reserve_spares": store.reserve_spares, "settle": store.settle,
                          "release": store.release, "record": store.record, "file_rows": store.file_rows,
                          "read": store.read,
                          "ping": store.ping, "close": store.close}
            for name in self.capabilities.self_timed & operations.keys():
                setattr(self, name, operations[name])   # shadows the timing method below

    def __getattr__(self, name: str) -> Any:
        """The wrapped store's own attribute (outside the protocol), untimed."""
        return getattr(self.wrapped, name)

    def reserve(self, request_id: str, lines: Sequence[ReserveLine], now: float,
                lease_until: float, need_group: bool = False) -> Awaitable[ReserveOutcome]:
        """The wrapped store's `reserve`, timed."""
        if need_group:
            return self._timed("reserve", self.wrapped.reserve, request_id, lines, now, lease_until, need_group)
        return self._timed("reserve", self.wrapped.reserve, request_id, lines, now, lease_until)

    def reserve_spares(self, spare_ids: Sequence[str], lines: Sequence[ReserveLine], now: float, lease_until: float,
                       room: int, needed_now: bool = True) -> Awaitable[ReserveOutcome]:
        """The wrapped store's `reserve_spares`, timed."""
        return self._timed("reserve_spares", self.wrapped.reserve_spares, spare_ids, lines, now, lease_until, room,
                           needed_now)

    def settle(self, request_id: str, actual: Sequence[tuple[CounterKey, Charge]], now: float,
               entry: LedgerEntry | None = None) -> Awaitable[Sequence[CounterState] | None]:
        """The wrapped store's `settle`, timed."""
        return self._timed("settle", self.wrapped.settle, request_id, actual, now, entry)

    def release(self, request_id: str, now: float, entry: LedgerEntry | None = None) -> Awaitable[bool]:
        """The wrapped store's `release`, timed."""
        return self._timed("release", self.wrapped.release, request_id, now, entry)

    def record(self, request_id: str, lines: Sequence[tuple[CounterKey, Charge, float]], now: float,
               entry: LedgerEntry | None = None) -> Awaitable[bool]:
        """The wrapped store's `record`, timed."""
        return self._timed("record", self.wrapped.record, request_id, lines, now, entry)

    def file_rows(self, entries: Sequence[LedgerEntry]) -> Awaitable[None]:
        """The wrapped store's `file_rows`, timed."""
        return self._timed("file_rows", self.wrapped.file_rows, entries)

    def read(self, counters: Sequence[CounterKey], now: float) -> Awaitable[list[CounterState]]:
        """The wrapped store's `read`, timed."""
        return self._timed("read", self.wrapped.read, counters, now)

    def ping(self) -> Awaitable[bool]:
        """The wrapped store's `ping`, timed."""
        return self._timed("ping", self.wrapped.ping)

    def close(self) -> Awaitable[None]:
        """The wrapped store's `close`, timed."""
        return self._timed("close", self.wrapped.close)

    def ledger(self, since: float, until: float, limit: int) -> Awaitable[list[LedgerEntry]]:
        """The wrapped store's `ledger`."""
        return self.wrapped.ledger(since, until, limit)

    def claim_alert(self, key: str, payload: str, now: float, lease_until: float,
                    expires_at: float) -> Awaitable[bool]:
        """The wrapped store's `claim_alert`."""
        return self.wrapped.claim_alert(key, payload, now, lease_until, expires_at)

    def alert_delivered(self, key: str, now: float) -> Awaitable[None]:
        """The wrapped store's `alert_delivered`."""
        return self.wrapped.alert_delivered(key, now)

    def pending_alerts(self, now: float, limit: int) -> Awaitable[list[tuple[str, str]]]:
        """The wrapped store's `pending_alerts`."""
        return self.wrapped.pending_alerts(now, limit)

    def canary_sync(self, canary: str, step: int, tallies: Sequence[ArmTally], now: float,
                    expires_at: float) -> Awaitable[CanaryRecord]:
        """The wrapped store's `canary_sync`."""
        return self.wrapped.canary_sync(canary, step, tallies, now, expires_at)

    def canary_move(self, canary: str, from_step: int, to_step: int, status: CanaryStatus, now: float,
                    expires_at: float) -> Awaitable[bool]:
        """The wrapped store's `canary_move`."""
        return self.wrapped.canary_move(canary, from_step, to_step, status, now, expires_at)

    def flush(self) -> None:
        """Send what the wrapped store holds back to share a write."""
        self.wrapped.flush()

    def observe_calls(self, observe: OperationObserver) -> None:
        """The wrapped store's self-timed operations report to `observe` instead."""
        self.wrapped.observe_calls(observe)

    def _timed(self, operation: str, call: Callable[..., Awaitable[Any]], *args: Any) -> Awaitable[Any]:
        """Start the operation; its duration and outcome are reported when it ends."""
        started = self._timer()
        try:
            result = call(*args)
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


_: type[BudgetStore] = InstrumentedStore   # mypy proves the wrapper keeps the contract
