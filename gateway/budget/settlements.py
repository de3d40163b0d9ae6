"""Settlements on their way to the store, off the response's path.

Each is kept to its end (a client that disconnects cannot cancel it); the counters it leaves go to the
`on_settled` listeners (budget alerts), and spend the store fails to take goes to the journal. A store
that bounds its own calls' time answers with a future: one callback finishes it, no task per request.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from gateway.budget.outage import Outage
from gateway.budget.rate_slots import PROVIDER_MARK
from gateway.budget.reservation import Reservation
from gateway.budget.store import CounterKey, CounterState, LedgerEntry
from gateway.budget.store_calls import StoreCalls
from gateway.domain.pricing import Charge
from gateway.errors import StoreError

__all__ = ["Settlements", "SettleListener"]

log = logging.getLogger("gateway.budget")
SettleListener = Callable[[Sequence[CounterState]], None]   # the settled counters' states


def _actual(reservation: Reservation, charge: Charge, served_by: str | None) -> list[tuple[CounterKey, Charge]]:
    """Each line's spend: `charge`, but nothing on the rate lines of providers that did not serve."""
    lines = reservation.lines
    if not reservation.skip and not lines[-1].group:   # the usual case: no provider limits (their lines come last)
        return [(line.counter, charge) for line in lines]
    mine = PROVIDER_MARK + (served_by or "")
    return [(line.counter, charge if not line.group or line.counter.policy == mine else _NOTHING) for line in lines]


_NOTHING = Charge()


class Settlements:
    """Sends settlements and releases of served requests; `listeners` hear the counters they leave."""

    def __init__(self, calls: StoreCalls, outage: Outage) -> None:
        self._calls = calls
        self._outage = outage
        self.listeners: list[SettleListener] = []

    def start(self, reservation: Reservation, charge: Charge | None, entry: LedgerEntry,
              served_by: str | None = None) -> asyncio.Future[Any]:
        """Settle the real cost in the store (release when nothing is charged); what to await for it.

        A provider's rate line (a line group) is charged only when that provider served the request
        (`served_by`); the others give their reservation back.
        """
        calls = self._calls
        assert calls.store is not None
        try:
            if charge is None:
                call: Awaitable[Any] = calls.store.release(reservation.held_as, entry.time, entry)
            else:
                call = calls.store.settle(reservation.held_as, _actual(reservation, charge, served_by),
                                          entry.time, entry)
        except StoreError as exc:
            return calls.spawn(self._failed(exc, reservation, charge, entry))
        if calls.bounds_time and isinstance(call, asyncio.Future):
            calls.background.add(call)
            call.add_done_callback(functools.partial(self._answered, reservation, charge, entry))
            return call
        return calls.spawn(self._await(call, reservation, charge, entry))

    async def _await(self, call: Awaitable[Any], reservation: Reservation, charge: Charge | None,
                     entry: LedgerEntry) -> None:
        try:
            result = await self._calls.bounded(call)
        except (StoreError, TimeoutError) as exc:
            await self._failed(exc, reservation, charge, entry)
            return
        self._store_answered(result)

    def _answered(self, reservation: Reservation, charge: Charge | None, entry: LedgerEntry,
                  call: asyncio.Future[Any]) -> None:
        """A store future's answer: counters to the listeners, or spend to the journal."""
        calls = self._calls
        calls.background.discard(call)
        if call.cancelled():                 # the store was closed under it
            calls.spawn(self._failed(StoreError("the store was closed"), reservation, charge, entry))
            return
        error = call.exception()
        if error is None:
            self._store_answered(call.result())
        elif isinstance(error, (StoreError, TimeoutError)):
            calls.spawn(self._failed(error, reservation, charge, entry))
        else:
            log.error("settling request %s failed: %r", reservation.request_id, error)

    def _failed(self, exc: BaseException, reservation: Reservation, charge: Charge | None,
                entry: LedgerEntry) -> Coroutine[Any, Any, None]:
        return self._outage.store_failed(exc, reservation.held_as, reservation.lines, charge, entry)

    def _store_answered(self, result: Any) -> None:
        self._outage.failures = 0
        if result and not isinstance(result, bool):   # a settle's counter states (a release says True/False)
            self._notify(result)

    def _notify(self, states: Sequence[CounterState]) -> None:
        """Hand the settled counters to every listener; a failing listener never fails the request."""
        for listener in self.listeners:
            try:
                listener(states)
            except Exception:
                log.exception("a budget settle listener failed")
