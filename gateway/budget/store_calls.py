"""The engine's store calls: bounded in time, kept to their end in the background, waited for on demand.

A store whose capabilities say `bounds_time` answers every call within its own timeout; any other call
is bounded here by a hard timeout (connecting plus one command), so a driver timeout that fails never
holds a request. Background work (settlements, spare batches and releases) is kept until it is done:
`settled`, `quiet` and `close` wait for it, and a client that disconnects cannot cancel it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Coroutine, Sequence
from typing import Any, TypeVar

from gateway.budget.store import PLAIN, BudgetStore, ReserveLine, ReserveOutcome
from gateway.clock import Clock
from gateway.config.model import StoreConfig
from gateway.errors import StoreError

__all__ = ["StoreCalls", "hard_timeout"]

T = TypeVar("T")


def hard_timeout(config: StoreConfig) -> float:
    """A bound on one store call even if a driver timeout fails: connecting plus one command."""
    return max(1.0, 4 * config.timeout_s) + 2 * config.timeout_s


class StoreCalls:
    """How the engine calls `store` (None: no store), and the background work it keeps until done."""

    def __init__(self, store: BudgetStore | None, clock: Clock, config: StoreConfig) -> None:
        capabilities = store.capabilities if store is not None else PLAIN
        self.store = store
        self.bounds_time = capabilities.bounds_time
        # answered in order within its own time: a reserve needs neither timer nor shield (see `reserve`)
        self.in_order_in_time = capabilities.bounds_time and capabilities.in_order
        self._clock = clock
        self.lease_s = config.lease_s
        self.hard_timeout_s = hard_timeout(config)
        self.background: set[asyncio.Future[Any]] = set()

    def reserve(self, request_id: str, lines: Sequence[ReserveLine], now: float,
                need_group: bool = False) -> Awaitable[ReserveOutcome]:
        """The store's reserve (not in order: run to its end even when the client leaves meanwhile).

        In order, the caller releases when its client leaves (`client_left`): the store runs that release
        after the reserve. Otherwise a client that disconnects does not cancel the store call half-way:
        the reservation is completed and then released, so it never lingers until its lease turns it
        into spend.
        """
        assert self.store is not None
        if self.in_order_in_time:
            if need_group:
                return self.store.reserve(request_id, lines, now, now + self.lease_s, need_group)
            return self.store.reserve(request_id, lines, now, now + self.lease_s)
        return self.bounded(self._reserve_to_the_end(request_id, lines, now, need_group))

    async def _reserve_to_the_end(self, request_id: str, lines: Sequence[ReserveLine], now: float,
                                  need_group: bool) -> ReserveOutcome:
        assert self.store is not None
        call = asyncio.ensure_future(self.store.reserve(request_id, lines, now, now + self.lease_s, need_group)
                                     if need_group else self.store.reserve(request_id, lines, now, now + self.lease_s))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(lambda done: self._release_abandoned(request_id, done))
            raise

    def _release_abandoned(self, request_id: str, call: asyncio.Future[ReserveOutcome]) -> None:
        """Release what a reserve whose client left has reserved."""
        if not call.cancelled() and call.exception() is None and call.result().ok:
            self.release_later(request_id, self._clock.now())

    def client_left(self, request_id: str, now: float) -> None:
        """The client of an in-order reserve left: release what it may have reserved (a no-op if the
        reserve was never sent)."""
        if self.in_order_in_time:
            self.release_later(request_id, now)

    def release_later(self, request_id: str, now: float) -> None:
        """Release `request_id`'s reservation in the background, whatever the store answers."""
        self.spawn(self._release_quietly(request_id, now))

    async def _release_quietly(self, request_id: str, now: float) -> None:
        assert self.store is not None
        with contextlib.suppress(StoreError, TimeoutError):
            await self.bounded(self.store.release(request_id, now))

    def bounded(self, call: Awaitable[T]) -> Awaitable[T]:
        """`call`, bounded by the hard timeout unless the store bounds the time of its own calls."""
        return call if self.bounds_time else self.within_hard_timeout(call)

    async def within_hard_timeout(self, call: Awaitable[T]) -> T:
        """`call`, bounded by the hard timeout."""
        async with asyncio.timeout(self.hard_timeout_s):
            return await call

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `coro` to completion even if its caller is cancelled; kept until done."""
        task = asyncio.ensure_future(coro)
        self.keep(task)
        return task

    def keep(self, work: asyncio.Future[Any]) -> None:
        """Hold background work until it is done (`settled` and `close` wait for it)."""
        self.background.add(work)
        work.add_done_callback(self.background.discard)

    def flush(self) -> None:
        """Send the store calls waiting to share a write now: someone waits for them."""
        if self.store is not None:
            self.store.flush()

    async def settled(self) -> None:
        """Wait until the background work started so far is done (settlements reached the store or the journal)."""
        if self.background:
            self.flush()                     # sent now rather than after their wait for company
            await asyncio.wait(list(self.background))

    async def quiet(self) -> None:
        """Wait until no background work is left, work started meanwhile included."""
        while self.background:
            await asyncio.wait(list(self.background))

    async def wind_down(self) -> None:
        """Wait (within the hard timeout) for the background work started so far."""
        if self.background:
            self.flush()
            await asyncio.wait(self.background, timeout=self.hard_timeout_s)
