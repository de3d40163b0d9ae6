"""Spare reservations: the next request's budget, reserved before it arrives.

Reserving costs a store round trip before the upstream call (about 0.2 ms on a loopback Redis, more
across a network). So a replica keeps, per set of budget counters, one spare reservation made in the
background with the worst case of the last request on those counters: the next request whose worst
case fits takes it at once, and the engine makes the next spare off the request's path.

A spare is an ordinary reservation in the store, with its own id and lease: it counts against the
limits like a request in flight, so spares never let spend pass a limit. What they could cost is
headroom, so a spare is made only while every limit it holds on has room for SPARE_ROOM times its
amount (near a limit there are none); one not taken is released after `idle_s`, and a request the
store refuses first takes back its own replica's spare. A replica that crashes turns its spares into
spend when their leases end, as it does its requests in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

from gateway.budget.slots import BudgetSlot
from gateway.budget.store import ReserveLine
from gateway.pricing import Charge

__all__ = ["SPARE_ROOM", "Spare", "SparePool", "SpareReservations"]

SPARE_ROOM = 4     # a spare is made only while every limit has room for this many of its amount
MAX_POOLS = 4096   # slot sets kept (they change with each window); more are released together


class Spare(NamedTuple):
    """A reservation held in the store under `spare_id`, not yet taken by a request."""

    spare_id: str
    lines: tuple[ReserveLine, ...]
    amount: Charge
    made_at: float                    # clock.monotonic() when it was asked for


class SparePool:
    """The spare of one set of budget counters, and whether the next one is being made."""

    __slots__ = ("spare", "timer", "making")

    def __init__(self) -> None:
        self.spare: Spare | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.making: asyncio.Future[None] | None = None   # done when the spare asked for is answered


class SpareReservations:
    """One spare per set of budget counters; `release` gives back the store's hold on a spare not taken."""

    def __init__(self, idle_s: float, monotonic: Callable[[], float], release: Callable[[str], object]) -> None:
        self.idle_s = idle_s
        self._monotonic = monotonic
        self._release = release
        self._pools: dict[int, tuple[tuple[BudgetSlot, ...], SparePool]] = {}
        self._by_counters: dict[tuple[object, ...], SparePool] = {}
        self._ids = itertools.count()
        self._prefix = f"spare-{os.getpid()}-{os.urandom(4).hex()}-"

    def pool(self, slots: tuple[BudgetSlot, ...]) -> SparePool:
        """The pool of the counters `slots` reserve on (slots of every caller and model share it)."""
        cached = self._pools.get(id(slots))
        if cached is not None and cached[0] is slots:
            return cached[1]
        if len(self._pools) >= MAX_POOLS:
            self.drain()
        counters = tuple((slot.counter, slot.limits, slot.expires_at) for slot in slots)
        pool = self._by_counters.get(counters)
        if pool is None:
            pool = self._by_counters[counters] = SparePool()
        self._pools[id(slots)] = (slots, pool)   # holding `slots` keeps its id from being reused
        return pool

    def take(self, pool: SparePool, amount: Charge) -> Spare | None:
        """The pool's spare if it covers `amount` in every unit and is fresh; a stale one is released."""
        spare = pool.spare
        if spare is None:
            return None
        if self._monotonic() - spare.made_at >= self.idle_s:
            self._give_back(pool)
            return None
        held = spare.amount
        if amount.usd_nano > held.usd_nano or amount.tokens > held.tokens or amount.requests > held.requests:
            return None
        pool.spare = None
        if pool.timer is not None:
            pool.timer.cancel()
            pool.timer = None
        return spare

    def new_spare(self, pool: SparePool, lines: Sequence[ReserveLine], amount: Charge) -> Spare:
        """A spare to ask the store for; the pool is `making` it until `made` or `not_made`."""
        pool.making = asyncio.get_running_loop().create_future()
        return Spare(f"{self._prefix}{next(self._ids)}", tuple(lines), amount, self._monotonic())

    def made(self, pool: SparePool, spare: Spare) -> None:
        """The store holds `spare`: keep it for the next request, released if unused for `idle_s`."""
        self.not_made(pool)
        if pool.spare is not None:           # drained meanwhile, or a window turned: keep the newer one
            self._give_back(pool)
        pool.spare = spare
        pool.timer = asyncio.get_running_loop().call_later(self.idle_s, self._give_back, pool)

    @staticmethod
    def not_made(pool: SparePool) -> None:
        """The store's answer to the spare is in (`made` follows if it holds it)."""
        making, pool.making = pool.making, None
        if making is not None and not making.done():
            making.set_result(None)

    async def reclaim(self, pool: SparePool, amount: Charge) -> tuple[Spare | None, str | None]:
        """After the store refused a request: the pool's spare if it covers `amount` (waiting for one being
        made), else the id of the spare to release before asking again (None: nothing held)."""
        if pool.making is not None:
            await asyncio.shield(pool.making)
        spare = self.take(pool, amount)
        if spare is not None or pool.spare is None:
            return spare, None
        held, pool.spare = pool.spare, None
        if pool.timer is not None:
            pool.timer.cancel()
            pool.timer = None
        return None, held.spare_id

    def drain(self) -> None:
        """Release every spare not taken (the gateway is stopping, or too many counter sets are kept)."""
        for pool in self._by_counters.values():
            self._give_back(pool)
        self._pools.clear()
        self._by_counters.clear()

    def _give_back(self, pool: SparePool) -> None:
        spare, pool.spare = pool.spare, None
        if pool.timer is not None:
            pool.timer.cancel()
            pool.timer = None
        if spare is not None:
            self._release(spare.spare_id)
